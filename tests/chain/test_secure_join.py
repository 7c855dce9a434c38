"""A training whose spec sets secure aggregation: a site joins with its registry key, copied
into the training at the join (issue 20: one site must not be able to halt a secure training).
On the in-process tester, a real anvil and a real Hardhat node."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from chain_support import refused
from conftest import fingerprint_of

from swarmnode.chain.accounts import dev_account
from swarmnode.chain.client import SwarmContract, SwarmRegistry
from swarmnode.chain.reverts import TABLE
from swarmnode.errors import IdentityError, NotNow
from swarmnode.node.secure import SecureAggregation
from swarmnode.privacy import keys
from swarmnode.privacy.keys import SiteKey

if TYPE_CHECKING:
    from conftest import Backend

SECURE = '{"max_weight": 100, "min_peers": 3, "secure_aggregation": true}'
PLAIN = '{"max_weight": 100, "min_peers": 3}'
MINE = SiteKey.generate()
K1, K2 = MINE.public_bytes, b"\x22" * 32


def test_a_secure_training_takes_only_sites_with_a_key_and_keeps_the_key_of_the_join(
        backend: Backend) -> None:
    registry = SwarmRegistry.deploy(backend.w3, dev_account(0))
    secure = SwarmContract.deploy(backend.w3, dev_account(0), SECURE, 3, 5, 60, registry=registry)
    plain = SwarmContract.deploy(backend.w3, dev_account(0), PLAIN, 3, 5, 60, registry=registry)
    assert secure.settings().secure_aggregation and not plain.settings().secure_aggregation
    site = dev_account(1).address
    registry.authorize(site, fingerprint_of(site))
    mine = secure.with_account(dev_account(1))
    mine.registry.enroll("10.0.0.5:7100")

    with refused(NotNow, "NoMaskKey", node=site):
        mine.join()
    assert "setPublicKey" in TABLE["NoMaskKey"].hint  # what to do: post the key first
    plain.with_account(dev_account(1)).join()  # a plain training needs no key
    assert plain.mask_key(site) is None

    mine.registry.set_public_key(K1)
    mine.join()
    assert secure.mask_key(site) == K1
    mine.registry.set_public_key(K2)  # posted again while the training runs: not taken
    assert registry.site(site).public_key == K2
    assert secure.mask_key(site) == K1
    assert secure.mask_key(dev_account(2).address) is None  # never joined

    # the node checks at start that it holds the key it joined with (its pair keys' key)
    def node(key: SiteKey) -> SecureAggregation:
        return SecureAggregation(site, mine, key, {"w": ((4,), "float32")}, clip=1.0,
                                 weight_cap=100, min_peers=3)

    node(MINE).check_joined_key()
    with pytest.raises(IdentityError, match="restore the secagg.key the site joined with"):
        node(SiteKey.generate()).check_joined_key()


def _encoding(u: int, top: bool = False) -> bytes:
    return (u | (1 << 255 if top else 0)).to_bytes(32, "little")


# every 32-byte key usable_public rejects: u (the key without its top bit, which X25519 ignores)
# congruent mod p to a low-order point's u; below 2^255 that is u itself and, for u < 19, u + p
_P = (1 << 255) - 19
LOW_ORDER_KEYS = [_encoding(u, top) for lo in sorted(keys._LOW_ORDER)
                  for u in (lo, lo + _P) if u < 1 << 255 for top in (False, True)]
# one step from a low-order encoding, each a usable key (not a real point's, which joins above):
# the neighbours of 1, p - 1 and p + 1, a bit flipped in each order-8 point, and the bit below the
# ignored one set
NEAR_MISSES = [_encoding(2), _encoding(_P - 2), _encoding(_P + 2, top=True),
               _encoding(max(keys._LOW_ORDER - {_P - 1}) ^ 1),
               _encoding(sorted(keys._LOW_ORDER)[3] ^ (1 << 8)), _encoding(1 << 254)]


def test_a_secure_training_refuses_a_low_order_key_at_the_join_exactly_as_the_nodes_do(
        backend: Backend) -> None:
    assert len(LOW_ORDER_KEYS) == 14 and len(set(LOW_ORDER_KEYS)) == 14
    assert not any(keys.usable_public(k) for k in LOW_ORDER_KEYS)
    assert all(keys.usable_public(k) for k in NEAR_MISSES)
    registry = SwarmRegistry.deploy(backend.w3, dev_account(0))
    secure = SwarmContract.deploy(backend.w3, dev_account(0), SECURE, 3, 5, 60, registry=registry)
    sites = [dev_account(i) for i in range(1, 1 + len(NEAR_MISSES))]
    for account in sites:
        registry.authorize(account.address, fingerprint_of(account.address))
        secure.with_account(account).registry.enroll("10.0.0.5:7100")
    site, mine = sites[0].address, secure.with_account(sites[0])

    for key in LOW_ORDER_KEYS:
        mine.registry.set_public_key(key)
        if key == bytes(32):  # the registry's empty slot: no key at all
            with refused(NotNow, "NoMaskKey", node=site):
                mine.join()
            continue
        with refused(NotNow, "LowOrderMaskKey", node=site, key="0x" + key.hex()) as exc:
            mine.join()
        assert key.hex() in str(exc.value)  # the message names the key
        assert secure.mask_key(site) is None  # nothing taken
    assert "secure-aggregation key" in TABLE["LowOrderMaskKey"].hint

    for account, key in zip(sites, NEAR_MISSES, strict=True):
        handle = secure.with_account(account)
        handle.registry.set_public_key(key)
        handle.join()
        assert secure.mask_key(account.address) == key
