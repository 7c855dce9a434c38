"""Signing accounts: the public dev mnemonic (dev chains only) and encrypted keystores.

Index 0 of the dev mnemonic is the admin by convention; indexes 1.. are nodes. A key from the dev
mnemonic is public knowledge, so :func:`account_for` only hands one out on a dev chain (chain id
31337 or 1337); on any other chain a keystore file is required.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from swarmnode.errors import ConfigError

__all__ = [
    "DEV_CHAIN_IDS",
    "DEV_MNEMONIC",
    "account_for",
    "dev_account",
    "dev_mnemonic",
    "load_keystore",
    "read_password_file",
]

DEV_MNEMONIC = "test test test test test test test test test test test junk"
DEV_CHAIN_IDS = frozenset({31337, 1337})
_DEV_ACCOUNTS = 100


def dev_mnemonic() -> str:
    """The dev chain's mnemonic: ``SWARMNODE_DEV_MNEMONIC`` (a geth --dev or Hardhat network,
    an anvil started with --mnemonic), else anvil's default."""
    return os.environ.get("SWARMNODE_DEV_MNEMONIC", "").strip() or DEV_MNEMONIC


def dev_account(index: int) -> LocalAccount:
    """Account ``index`` of the dev mnemonic (0 = admin, 1.. = nodes)."""
    if not 0 <= index < _DEV_ACCOUNTS:
        raise ConfigError(f"dev key index {index} is out of range; use 0..{_DEV_ACCOUNTS - 1}")
    return _derive(dev_mnemonic(), index)


@lru_cache(maxsize=4 * _DEV_ACCOUNTS)
def _derive(mnemonic: str, index: int) -> LocalAccount:
    Account.enable_unaudited_hdwallet_features()
    try:
        return Account.from_mnemonic(mnemonic, account_path=f"m/44'/60'/0'/0/{index}")
    except Exception as exc:  # noqa: BLE001 - eth_account raises several kinds
        raise ConfigError(f"SWARMNODE_DEV_MNEMONIC is not a valid BIP-39 mnemonic: {exc}") from None


def load_keystore(path: Path | str, password: str) -> LocalAccount:
    """Decrypt an Ethereum keystore (V3 JSON) file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"keystore file {path} does not exist; check --keystore") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read keystore file {path}: {exc}") from None
    except ValueError:
        raise ConfigError(
            f"keystore file {path} is not JSON; pass an Ethereum V3 keystore (from geth or "
            "`cast wallet new`)"
        ) from None
    if not isinstance(data, dict) or "crypto" not in {k.lower() for k in data}:
        raise ConfigError(f"keystore file {path} has no 'crypto' section; it is not a V3 keystore")
    try:
        key = Account.decrypt(data, password)
    except ValueError as exc:
        if "MAC mismatch" in str(exc):
            raise ConfigError(
                f"wrong password for keystore {path}; check --password-file"
            ) from None
        raise ConfigError(f"cannot decrypt keystore {path}: {exc}") from None
    return Account.from_key(key)


def read_password_file(path: Path | str) -> str:
    """The password in ``path``, without its trailing newline."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except FileNotFoundError:
        raise ConfigError(f"password file {path} does not exist; check --password-file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read password file {path}: {exc}") from None


def account_for(
    chain: Web3 | str,
    key_index: int | None = None,
    keystore: Path | str | None = None,
    password: str | None = None,
    password_file: Path | str | None = None,
) -> LocalAccount:
    """The signing account to use on ``chain`` (a Web3 or an RPC URL).

    ``key_index`` picks a dev-mnemonic account and is refused unless the chain is a dev chain;
    otherwise ``keystore`` and its password (``password`` or ``password_file``) are required.
    """
    if keystore is not None:
        if key_index is not None:
            raise ConfigError("pass either a dev key index or a keystore, not both")
        if password is None and password_file is not None:
            password = read_password_file(password_file)
        if password is None:
            raise ConfigError(f"keystore {keystore} needs a password; pass --password-file")
        return load_keystore(keystore, password)
    if key_index is None:
        raise ConfigError("no signing key given; pass --keystore FILE --password-file FILE")
    from swarmnode.chain.client import chain_id, connect

    w3 = connect(chain) if isinstance(chain, str) else chain
    cid = chain_id(w3)
    if cid not in DEV_CHAIN_IDS:
        raise ConfigError(
            f"--key-index {key_index} uses the public dev mnemonic, which is only allowed on a dev "
            f"chain (chain id 31337 or 1337); this chain has id {cid}: pass --keystore FILE "
            "--password-file FILE instead"
        )
    return dev_account(key_index)
