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
