"""swarmnode.identity"""
