"""swarmnode: an open swarm-learning runtime.

Sites train one model together without moving their data: a smart contract enrols them and elects a
merge leader per round; parameters travel only between sites over mutual-TLS gRPC.
"""

__version__ = "0.1.0"
