// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ISwarmRegistry} from "./ISwarmRegistry.sol";

/// @title SwarmRegistry: the sites of one consortium, for all of its trainings.
/// @notice One deployment per consortium; it outlives trainings. The admin authorises a site's
/// chain address with the SHA-256 fingerprint of its TLS certificate, or revokes it; an
/// authorised site enrols once with its peer endpoint and may publish one `bytes32` public key
/// (for protocols that need one, such as secure aggregation). Trainings (`SwarmTraining`) name
/// this registry and ask it who is enrolled and who is revoked, so a site authorised once takes
/// part in every training and a revocation takes effect in all of them at once.
/// @dev Reverts with custom errors (typed arguments); swarmnode decodes each by its selector.
contract SwarmRegistry is ISwarmRegistry {
    /// A site's flags in one slot: the word trainings read on every call (`siteFlags`).
    struct Site {
        bool authorized;
        bool enrolled;
        bool revoked;
        uint16 index; // position in _siteList (enrolled sites only)
        uint40 enrolledAt;
    }

    uint256 internal constant FLAG_AUTHORIZED = 1;
    uint256 internal constant FLAG_ENROLLED = 2;
    uint256 internal constant FLAG_REVOKED = 4;
    /// Gas each training gets to expel a revoked site (leaving the open round may elect).
    uint256 public constant EXPEL_GAS = 400_000;

    address public immutable admin;
    /// @notice The block this registry was deployed in: its event log starts there.
    uint256 public immutable deployedBlock;

    address[] private _siteList;
    address[] private _trainings;
    mapping(address => Site) private _site;
    mapping(address => bytes32) private _fingerprint; // SHA-256 of the certificate's DER
    mapping(address => string) private _endpoint; // host:port of the site's peer API
    mapping(address => bytes32) private _publicKey; // a per-site key slot (0: none)
    mapping(address => bool) private _isTraining;

    event Authorized(address indexed site, bytes32 fingerprint);
    event Revoked(address indexed site);
    event Enrolled(address indexed site, string endpoint, bytes32 fingerprint);
    event EndpointUpdated(address indexed site, string endpoint);
    event PublicKeySet(address indexed site, bytes32 key);
    event TrainingAdded(address indexed training);
    /// A training could not set a revoked site aside in the revoking transaction (its nodes do
    /// it with markAbsent, which accepts a site the registry revoked).
    event ExpelFailed(address indexed training, address indexed site);

    error NotAdmin(address caller, address admin);
    error ZeroAddress();
    error ZeroFingerprint();
    error SiteRevoked(address site);
    error SiteNotAuthorized(address site);
    error SiteAlreadyRevoked(address site);
    error SiteAlreadyEnrolled(address site);
    error SiteNotEnrolled(address site);
    error EmptyEndpoint();
    error RegistryFull(uint256 sites);
    error NotATraining(address training);
    error TrainingAlreadyAdded(address training);
    error NotEnoughGasToExpel(uint256 trainingsLeft, uint256 gasEach);

    constructor() {
        admin = msg.sender;
        deployedBlock = block.number;
    }

    // ------------------------------------------------------------------ admin

    /// @notice Authorise `site` with its certificate fingerprint; again to rotate the certificate.
    function authorize(address site, bytes32 certFingerprint) external {
        _onlyAdmin();
        if (site == address(0)) revert ZeroAddress();
        if (certFingerprint == 0) revert ZeroFingerprint();
        Site memory s = _site[site];
        if (s.revoked) revert SiteRevoked(site);
        _fingerprint[site] = certFingerprint;
        if (!s.authorized) {
            s.authorized = true;
            _site[site] = s;
        }
        emit Authorized(site, certFingerprint);
    }

    /// @notice Revoke `site` for good: it can do nothing more in any training of this registry.
    /// Every listed training sets it aside in this transaction (`SwarmTraining.expel`); a
    /// training that fails to does not stop the revocation, and any site may expel it there
    /// later (`markAbsent` accepts a revoked site at once).
    function revoke(address site) external {
        _onlyAdmin();
        Site memory s = _site[site];
        if (!s.authorized) revert SiteNotAuthorized(site);
        if (s.revoked) revert SiteAlreadyRevoked(site);
        s.revoked = true;
        _site[site] = s;
        emit Revoked(site);
        uint256 n = _trainings.length;
        for (uint256 i = 0; i < n; i++) {
            // the gas each expel may need is reserved up front, so an estimate (or a caller
            // short of gas) cannot revoke here while silently skipping a training
            if (gasleft() < EXPEL_GAS + 10_000) revert NotEnoughGasToExpel(n - i, EXPEL_GAS);
            try ITrainingOfRegistry(_trainings[i]).expel{gas: EXPEL_GAS}(site) {}
            catch {
                emit ExpelFailed(_trainings[i], site); // any site may expel it there later
            }
        }
    }

    /// @notice Record a training of this consortium (deployed by the admin, naming this registry)
    /// so that sites and tools can list the consortium's trainings.
    function addTraining(address training) external {
        _onlyAdmin();
        if (_isTraining[training]) revert TrainingAlreadyAdded(training);
        // a low-level call: a contract answering nothing (or garbage) is not a training, and a
        // decoding failure would escape a try/catch
        (bool ok, bytes memory answer) =
            training.staticcall(abi.encodeCall(ITrainingOfRegistry.registry, ()));
        if (!ok || answer.length != 32 || abi.decode(answer, (uint256)) != uint160(address(this)))
        {
            revert NotATraining(training);
        }
        _isTraining[training] = true;
        _trainings.push(training);
        emit TrainingAdded(training);
    }

    // ------------------------------------------------------------------ sites

    /// @notice Enrol the calling (authorised) site with its peer endpoint `host:port`.
    function enroll(string calldata endpoint) external {
        Site memory s = _site[msg.sender];
        if (s.revoked) revert SiteRevoked(msg.sender);
        if (!s.authorized) revert SiteNotAuthorized(msg.sender);
        if (s.enrolled) revert SiteAlreadyEnrolled(msg.sender);
        if (bytes(endpoint).length == 0) revert EmptyEndpoint();
        if (_siteList.length >= type(uint16).max) revert RegistryFull(_siteList.length);
        s.enrolled = true;
        s.index = uint16(_siteList.length);
        s.enrolledAt = uint40(block.timestamp);
        _site[msg.sender] = s;
        _siteList.push(msg.sender);
        _endpoint[msg.sender] = endpoint;
        emit Enrolled(msg.sender, endpoint, _fingerprint[msg.sender]);
    }

    /// @notice Change the calling site's peer endpoint (a restart on a new host or port).
    function updateEndpoint(string calldata endpoint) external {
        _enrolledSender();
        if (bytes(endpoint).length == 0) revert EmptyEndpoint();
        _endpoint[msg.sender] = endpoint;
        emit EndpointUpdated(msg.sender, endpoint);
    }

    /// @notice Publish (or replace) the calling site's public key for protocols that need one.
    function setPublicKey(bytes32 key) external {
        _enrolledSender();
        _publicKey[msg.sender] = key;
        emit PublicKeySet(msg.sender, key);
    }

    // ------------------------------------------------------------------ views

    /// @inheritdoc ISwarmRegistry
    function siteFlags(address site) external view returns (uint256 flags) {
        Site memory s = _site[site];
        if (s.authorized) flags |= FLAG_AUTHORIZED;
        if (s.enrolled) flags |= FLAG_ENROLLED;
        if (s.revoked) flags |= FLAG_REVOKED;
    }

    /// @inheritdoc ISwarmRegistry
    function endpointOf(address site) external view returns (string memory) {
        return _endpoint[site];
    }

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
        )
    {
        Site memory s = _site[site];
        return (_fingerprint[site], _endpoint[site], s.authorized, s.enrolled, s.revoked,
            s.enrolledAt, _publicKey[site]);
    }

    function siteList() external view returns (address[] memory) {
        return _siteList;
    }

    function trainings() external view returns (address[] memory) {
        return _trainings;
    }

    /// @inheritdoc ISwarmRegistry
    function isTraining(address training) external view returns (bool) {
        return _isTraining[training];
    }

    // ------------------------------------------------------------------ internals

    function _onlyAdmin() internal view {
        if (msg.sender != admin) revert NotAdmin(msg.sender, admin);
    }

    function _enrolledSender() internal view {
        Site memory s = _site[msg.sender];
        if (s.revoked) revert SiteRevoked(msg.sender);
        if (!s.enrolled) revert SiteNotEnrolled(msg.sender);
    }
}

interface ITrainingOfRegistry {
    function registry() external view returns (address);

    function expel(address site) external;
}
