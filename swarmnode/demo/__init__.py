"""The demo: a whole swarm of hospitals on one machine, on the bundled breast-cancer data.

:mod:`swarmnode.demo.data` splits the data into uneven hospital shards and a shared test set;
:mod:`swarmnode.demo.model` holds the small model, its training loop and its scores; the
orchestrator and the trainer script run the swarm itself.
"""
