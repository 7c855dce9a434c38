"""Merged models this node holds, by round; the latest one survives a restart on disk.

Bytes are the canonical safetensors bytes whose SHA-256 is the digest committed on chain, so what is
served to peers is exactly what was verified. The copy on disk is written by a helper thread, off
the round's critical path; a newer round's model replaces a pending older one unwritten.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ModelStore", "StoredModel"]

log = logging.getLogger("swarmnode.node")


@dataclass(frozen=True)
class StoredModel:
    round: int
    digest: bytes
    data: Any  # bytes-like: bytes, bytearray or mmap; never changed once stored


class ModelStore:
    """Thread-safe; keeps the last ``keep`` rounds in memory and the latest on disk."""

    def __init__(self, data_dir: Path, keep: int = 2) -> None:
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._models: dict[int, StoredModel] = {}
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._written = 0
        self._pending: StoredModel | None = None
        self._writer: threading.Thread | None = None
        self._load_latest()

    @property
    def _meta_path(self) -> Path:
        return self.dir / "latest.json"

    @property
    def _data_path(self) -> Path:
        return self.dir / "latest.safetensors"

    def _load_latest(self) -> None:
        import hashlib

        try:
            meta = json.loads(self._meta_path.read_text())
            data = self._data_path.read_bytes()
        except (OSError, ValueError):
            return
        digest = bytes.fromhex(meta.get("digest", ""))
        if hashlib.sha256(data).digest() == digest:  # a torn write is ignored, not trusted
            self._models[int(meta["round"])] = StoredModel(int(meta["round"]), digest, data)
            self._written = int(meta["round"])

    def put(self, round: int, digest: bytes, data: Any) -> None:
        model = StoredModel(round, digest, data)
        with self._cond:
            held = self._models.get(round)
            if held is not None and held.digest == digest:
                return
            self._models[round] = model
            for old in sorted(self._models)[: -self.keep]:
                del self._models[old]
            is_latest = round == max(self._models)
            self._cond.notify_all()
            if is_latest:
                self._pending = model
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_pending,
                                                    name="store-writer", daemon=True)
                    self._writer.start()

    def _write_pending(self) -> None:
        while True:
            with self._cond:
                model, self._pending = self._pending, None
                if model is None:
                    self._writer = None
                    self._cond.notify_all()
                    return
            try:
                self._write_latest(model)
            except OSError as exc:  # the in-memory copy still serves; say why the disk did not
                log.warning(
                    "could not save round %d's model to %s: %s", model.round, self.dir, exc)

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until the latest model is on disk (False if still writing after ``timeout``)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._writer is None, timeout=timeout)

    def close(self) -> None:
        self.flush()

    def _write_latest(self, model: StoredModel) -> None:
        """Data first, then its metadata, each by an atomic rename; an older round never
        overwrites a newer one (two threads may finish rounds out of order)."""
        with self._write_lock:
            if model.round < self._written:
                return
            tmp = self.dir / "latest.safetensors.tmp"
            with open(tmp, "wb") as f:
                f.write(model.data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._data_path)
            meta = {"round": model.round, "digest": model.digest.hex()}
            tmp = self.dir / "latest.json.tmp"
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, self._meta_path)
            self._written = model.round

    def get(self, round: int) -> StoredModel | None:
        with self._cond:
            return self._models.get(round)

    def wait(self, round: int, timeout: float) -> StoredModel | None:
        with self._cond:
            self._cond.wait_for(lambda: round in self._models, timeout=timeout)
            return self._models.get(round)

    def latest(self) -> StoredModel | None:
        with self._cond:
            return self._models[max(self._models)] if self._models else None
