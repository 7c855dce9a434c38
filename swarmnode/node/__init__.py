"""swarmnode.node"""
