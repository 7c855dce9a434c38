// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title What a training asks its consortium's registry.
interface ISwarmRegistry {
    /// @notice The registry's admin (the only account that may deploy its trainings).
    function admin() external view returns (address);

    /// @notice One word per call: bit 0 authorised, bit 1 enrolled, bit 2 revoked.
    function siteFlags(address site) external view returns (uint256);

    /// @notice The site's peer endpoint (`host:port`), empty before it enrols.
    function endpointOf(address site) external view returns (string memory);

    /// @notice Whether the admin listed `training` (its revocations reach it).
    function isTraining(address training) external view returns (bool);

    /// @notice What the registry holds on `site` (the last word: its key slot, 0 when empty).
    function siteInfo(address site)
        external
        view
        returns (
            bytes32 fingerprint,
            string memory endpoint,
            bool authorized,
            bool enrolled,
            bool revoked,
            uint256 enrolledAt,
            bytes32 publicKey
        );
}
