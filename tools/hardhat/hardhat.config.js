// The Hardhat network that swarmnode's launcher (swarmnode/chain/launcher.py, DevChain with
// kind="hardhat") starts with `hardhat node`: a second Ethereum implementation for the tests.
// Every setting comes from the launcher through SWARMNODE_HARDHAT_* variables; the defaults
// match anvil's dev chain (chain id 31337, the public "test ... junk" mnemonic, 100 funded
// accounts) so that swarmnode.chain.accounts.dev_account(i) holds funds on either chain.
const env = process.env;
const interval = Number(env.SWARMNODE_HARDHAT_INTERVAL_MS || "0");  // 0: no interval mining

module.exports = {
  // nothing to compile: the contracts are built by swarmnode.chain.compile (solc, evmVersion prague)
  paths: { sources: "./no-sources", cache: env.SWARMNODE_HARDHAT_CACHE || "./cache" },
  networks: {
    hardhat: {
      chainId: Number(env.SWARMNODE_HARDHAT_CHAIN_ID || "31337"),
      // the EVM version the contracts are compiled for; berlin or older: no base fee
      hardfork: env.SWARMNODE_HARDHAT_HARDFORK || "prague",
      accounts: {
        mnemonic: env.SWARMNODE_HARDHAT_MNEMONIC
          || "test test test test test test test test test test test junk",
        count: Number(env.SWARMNODE_HARDHAT_ACCOUNTS || "100"),
        accountsBalance: "10000000000000000000000",  // 10,000 ether, as anvil funds them
      },
      mining: {
        auto: env.SWARMNODE_HARDHAT_AUTOMINE === "1",
        interval: interval > 0 ? interval : 0,
      },
      loggingEnabled: false,
    },
  },
};
