"""swarmnode.chain"""
