"""The chain: the contracts (a consortium's SwarmRegistry, its SwarmTrainings), their compilation,
the custom errors' table, a dev-chain launcher (anvil or Hardhat's node: the only module that knows
either), the chain gateway, signing accounts.

Web3 types and revert exceptions stay inside this package; callers see :class:`SwarmContract` and
:class:`SwarmRegistry`, the frozen values of :mod:`swarmnode.chain.models` and
:mod:`swarmnode.errors`.

- :mod:`~swarmnode.chain.client`: ``connect(rpc_url)``, ``SwarmContract`` (deploy, calls, views,
  events, ``wait_for``)
- :mod:`~swarmnode.chain.accounts`: dev-mnemonic accounts (dev chains only) and keystores
- :mod:`~swarmnode.chain.launcher`: ``DevChain``, an anvil process (the only anvil-aware module)
- :mod:`~swarmnode.chain.compile`: solc via ``tools/solc.js``; ``load_artifact()``
- :mod:`~swarmnode.chain.overview`: the read-only summary behind ``swarmnode status``
- :mod:`~swarmnode.chain.report`: per-round metrics by site, CSV and plot (``swarmnode report``)
- :mod:`~swarmnode.chain.epsilon`: a DP site's epsilon at its delta as the chain records it (the
  rule for reported values, packing, reading ``PrivacyReported``)
"""
