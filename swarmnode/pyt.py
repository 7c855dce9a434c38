"""``from swarmnode.pyt import SwarmCallback``: where an HPE Swarm Learning PyTorch script
(``from swarmlearning.pyt import SwarmCallback``) finds its callback after a one-line port."""

from swarmnode.callback import SwarmCallback

__all__ = ["SwarmCallback"]
