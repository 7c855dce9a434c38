"""The rules a training spec with ``secure_aggregation: true`` must keep, and the refusal to run
one on a node whose transport cannot carry its seed reveals (no data plane).

Each rule raises ValueError saying what to change (TrainingSpec turns it into a ConfigError).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from swarmnode.errors import ConfigError
from swarmnode.privacy import ring

__all__ = ["MIN_SITES", "check_first_round", "check_initial", "check_noise", "check_spec",
           "refuse_until_wired", "sums"]

# With two sites the leader (itself a participant) learns the other's update from the sum.
MIN_SITES = 3


def sums(adding: int) -> bool:
    """Whether a secure round in which ``adding`` sites add weight (above 0) forms a sum: only
    with at least MIN_SITES (with two, each learns the other's update from the sum). Otherwise
    the round commits its starting model again (with none adding, the sum's mean change would
    be zero anyway)."""
    return adding >= MIN_SITES


def check_spec(*, merge_method: str, merge_options: Mapping[str, float], min_peers: int,
               topology: str, compression: str, max_weight: int | None) -> None:
    """ValueError unless secure aggregation can run with these settings."""
    if merge_method != "mean":
        raise ValueError(
            f"secure aggregation gives the leader only the sum of the updates, and merge rule "
            f"'{merge_method}' needs each update apart (a robust rule looks at individual "
            "updates); use merge_method 'mean' (with clip_norm as the defence) or turn "
            "secure_aggregation off")
    if min_peers < MIN_SITES:
        raise ValueError(
            f"secure aggregation needs min_peers at least {MIN_SITES}, got {min_peers}: with 2 "
            "sites the leader learns the other's update from the sum; raise min_peers")
    if topology != "leader":
        raise ValueError(
            f"secure aggregation runs with topology 'leader' only, got '{topology}': the "
            "masks, the dropout reveals and the norm check span the whole update, and a slice "
            "owner sees one slice; use topology 'leader'")
    if compression != "none":
        raise ValueError(
            f"secure aggregation cannot use compression '{compression}': masked values are "
            "uniform ring elements that rounding would destroy (the masks would no longer "
            "cancel), and the update is already sent as fixed point of the change; use "
            "compression 'none'")
    clip = merge_options.get("clip_norm")
    if clip is None:
        raise ValueError(
            "secure aggregation needs merge option clip_norm (the L2 bound each site clips "
            "its change to before encoding): the ring's width and the leader's check of the "
            "sum depend on it; set clip_norm (e.g. `swarmnode spec --clip-norm 10`)")
    if max_weight is None:
        raise ValueError(
            "secure aggregation needs max_weight (the largest weight a site checks in with): "
            "the ring must hold every weight times clip_norm; set max_weight")
    try:
        ring.plan(ring.MAX_SITES, max_weight, clip)
    except ConfigError as exc:
        raise ValueError(
            f"{exc} (the spec's ring holds up to {ring.MAX_SITES} sites at "
            f"{ring.FRACTION_BITS} fractional bits in {ring.RING_BITS} bits)") from None
    check_first_round(max_weight)


def check_first_round(max_weight: int) -> None:
    """ValueError when ``max_weight`` leaves round 1 no room: it has no starting model, so the
    parameters are encoded whole, in fewer fractional bits, and bounded by
    ring.first_round_clip (the widest the ring then holds)."""
    first = ring.first_round_clip(max_weight)
    if first < 1:
        widest = ((1 << (ring.RING_BITS - 1)) - 1) // ring.MAX_SITES // (
            3 << ring.FIRST_FRACTION_BITS)
        raise ValueError(
            f"max_weight {max_weight} leaves round 1 no room: it has no starting model, so "
            f"the sites encode their parameters whole ({ring.FIRST_FRACTION_BITS} fractional "
            f"bits), and the ring then holds a parameter vector of norm {first:g}; lower "
            f"max_weight to at most {widest} (far lower for a large model: at most "
            "2^55 / (2^16 x the parameters' norm))")


def check_initial(norm: float, max_weight: int) -> None:
    """ValueError when the initial parameters' L2 norm (floating tensors) is over round 1's
    bound at ``max_weight`` (ring.first_round_clip): round 1 would scale the model down."""
    first = ring.first_round_clip(max_weight)
    if not norm <= first:
        raise ValueError(
            f"the initial parameters have L2 norm {norm:.6g}, over {first:.6g}, the widest "
            f"round 1 holds at max_weight {max_weight} (it encodes the parameters whole): its "
            "merged model would be scaled down; lower max_weight (the bound grows as "
            "2^55 / (2^16 x max_weight))")


def check_noise(noise: Any, *, secure_aggregation: bool, merge_options: Mapping[str, float],
                max_weight: int | None, params: Mapping[str, Any]) -> None:
    """ValueError unless the spec's ``distributed_noise`` (a noise.DistributedNoise, or None) can
    run: only with secure aggregation (the shares are summed under the masks: without them the
    leader would see each site's noisy update with its one share), and the ring must hold the
    noise on top of the updates (noise.check_ring). Call after :func:`check_spec`."""
    if noise is None:
        return
    if not secure_aggregation:
        raise ValueError(
            "distributed_noise needs secure_aggregation: true: each site adds only its share "
            "of the noise, which protects an update only inside the masked sum (in the clear "
            "the leader would see each update with one share); set secure_aggregation, or use "
            "DP-SGD at each site (SwarmCallback(..., privacy_engine=...)) instead")
    from swarmnode.privacy import noise as dn  # numpy only, but not needed without noise

    plan = ring.plan(ring.MAX_SITES, int(max_weight or 1), merge_options["clip_norm"])
    dn.check_ring(noise, plan, max(dn.parameter_count(params), 1))


def refuse_until_wired(spec_json: str, *, reveals_carried: bool) -> None:
    """ConfigError when the spec asks for secure aggregation and this node's transport cannot
    carry the seed-reveal request: the in-process transport (:mod:`swarmnode.testing.inproc`)
    and the data plane carry it; a node whose data plane is turned off (``data_port: -1``)
    could not complete a round with a dropout, so it is refused at start. The one place this
    refusal lives (node start calls it)."""
    if reveals_carried:
        return
    try:
        raw = json.loads(spec_json)
    except ValueError:
        return  # not JSON: the spec's own parser says what is wrong
    if isinstance(raw, dict) and raw.get("secure_aggregation"):
        raise ConfigError(
            "the training spec sets secure_aggregation, whose seed reveals travel on the data "
            "plane, and this node turns its data plane off (data_port: -1); remove data_port "
            "from node.yaml (default: the peer port + 1) or set a port")
