"""swarmnode.transport"""
