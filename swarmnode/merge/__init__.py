"""swarmnode.merge"""
