"""Keys for secure aggregation: one X25519 key pair per site, pair keys, round seeds.

- Each site makes an X25519 key pair for secure aggregation alone (never its TLS or chain key:
  a round seed may be revealed, and nothing derived from an identity key ever must be) and posts
  it in the registry's per-site slot; the trainings on that registry share it, each with pair
  keys of its own (below).
- Pair key of sites a and b: HKDF-SHA256 over the X25519 shared secret, its context binding the
  chain id, the training's address and both site addresses in ascending order, so a and b derive
  the same 32 bytes and no other training, chain or pair does.
- Round seed: HMAC-SHA256(pair key, round, attempt). A dropout reveal hands out only this seed:
  HMAC is a PRF, so one round's seed tells nothing about another round's, nor about the pair key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from swarmnode.errors import ConfigError, IdentityError

__all__ = ["KEY_BYTES", "SiteKey", "address_bytes", "pair_key", "round_seed", "usable_public"]

KEY_BYTES = 32
_PAIR_SALT = b"swarmnode-secagg/1 pair key"
_ROUND_LABEL = b"swarmnode-secagg/1 round seed"
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


_P = (1 << 255) - 19
# u-coordinates (mod p) of the points of order dividing 8 on Curve25519 and its twist: X25519
# with any clamped scalar (a multiple of 8) maps them to the all-zero secret, and only them
_LOW_ORDER = frozenset({
    0, 1, _P - 1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
})


def usable_public(key: bytes | None) -> bool:
    """Whether ``key`` is an X25519 public key a pair key can be made with: 32 bytes and not a
    low-order point (all zero included, any encoding: the top bit ignored, u taken mod p), the
    points ``pair_key`` refuses. Pure: every site computes the same answer."""
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        return False
    u = int.from_bytes(key, "little") & ((1 << 255) - 1)
    return u % _P not in _LOW_ORDER


def address_bytes(address: str, what: str = "address") -> bytes:
    """The 20 bytes of an Ethereum address ``0x`` + 40 hex digits (any case)."""
    if not isinstance(address, str) or not _ADDRESS.fullmatch(address):
        raise ConfigError(f"secure aggregation: {what} {address!r} is not an Ethereum address "
                          "(0x and 40 hex digits)")
    return bytes.fromhex(address[2:])


@dataclass(frozen=True)
class SiteKey:
    """A site's key pair for one training. Keep ``private_bytes()`` in the site's data folder
    (a restart must mask with the same keys); publish ``public_bytes`` on chain."""

    private: X25519PrivateKey

    @classmethod
    def generate(cls) -> SiteKey:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> SiteKey:
        if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
            raise IdentityError("a secure-aggregation private key is 32 raw bytes; make a new "
                                "one for a new training (SiteKey.generate())")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @property
    def public_bytes(self) -> bytes:
        return self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _context(chain_id: int, training: str, a: str, b: str) -> bytes:
    if isinstance(chain_id, bool) or not isinstance(chain_id, int) \
            or not 0 <= chain_id < 1 << 64:
        raise ConfigError(f"secure aggregation: chain id {chain_id!r} must be a whole number "
                          "in 0..2^64-1")
    first, second = address_bytes(a, "site address"), address_bytes(b, "site address")
    if first == second:
        raise ConfigError(f"secure aggregation: a site has no pair key with itself ({a})")
    low, high = sorted((first, second))
    return (struct.pack(">Q", chain_id) + address_bytes(training, "training address")
            + low + high)


def pair_key(mine: SiteKey, their_public: bytes, *, chain_id: int, training: str, me: str,
             peer: str) -> bytes:
    """The 32-byte key ``me`` shares with ``peer`` in this training (the same at both ends)."""
    info = _context(chain_id, training, me, peer)
    if not isinstance(their_public, bytes) or len(their_public) != KEY_BYTES:
        raise IdentityError(f"secure aggregation: {peer}'s public key must be 32 raw bytes "
                            "(X25519), as posted on chain; the site must post its key again")
    try:
        shared = mine.private.exchange(X25519PublicKey.from_public_bytes(their_public))
    except ValueError:  # a low-order point: the shared secret would be all zeros
        raise IdentityError(f"secure aggregation: {peer}'s public key is a low-order point "
                            "(no shared secret); the site must post a freshly made key") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=_PAIR_SALT,
                info=info).derive(shared)


def round_seed(key: bytes, round_number: int, attempt: int = 0) -> bytes:
    """The pair's 32-byte seed for one round attempt: HMAC-SHA256(pair key, round, attempt)."""
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ConfigError("secure aggregation: a pair key is 32 bytes (from pair_key)")
    for name, value, limit in (("round", round_number, 1 << 64), ("attempt", attempt, 1 << 32)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
            raise ConfigError(f"secure aggregation: {name} {value!r} must be a whole number in "
                              f"0..{limit - 1}")
    message = _ROUND_LABEL + struct.pack(">QI", round_number, attempt)
    return hmac.new(key, message, hashlib.sha256).digest()
