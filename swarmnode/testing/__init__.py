"""Test support that runs the product itself: an in-process swarm (:mod:`swarmnode.testing.inproc`)
of real node services on the real contracts, on an in-process EVM. Needs the ``dev`` extra
(``web3[tester]``: eth-tester and py-evm)."""
