"""Merged models this node holds, by round: on disk, in memory only until written.

Bytes are the canonical safetensors bytes whose SHA-256 is the digest committed on chain, so what is
served to peers is exactly what was verified. A model put here is written to
``round-<r>.safetensors`` by a helper thread, off the round's critical path; until then it is
served from the memory it came in (the leader's accumulator, a member's pull buffer). Once written
the store lets that memory go and reads hand out a fresh read-only mapping of the file, so a node
does not keep the last rounds resident between rounds (the kernel's page cache holds them, and can
reclaim them). The newest round is also ``latest.safetensors`` (+ ``latest.json``: round,
digest and training), which survives a restart and is what ``swarmnode audit --model`` checks; a
store for another training (a site's next training on the same volume) starts afresh from it.

Files are never rewritten in place: each is written under a temporary name and renamed, so a
mapping handed out earlier keeps seeing the bytes it was given.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swarmnode.transport import serde

__all__ = ["ModelStore", "StoredModel"]

log = logging.getLogger("swarmnode.node")


@dataclass(frozen=True)
class StoredModel:
    round: int
    digest: bytes
    data: Any  # bytes-like: bytes, bytearray or mmap; never changed once stored


@dataclass
class _Entry:
    digest: bytes
    data: Any  # the bytes while not yet on disk, else None
    path: Path | None = None  # the file once written


def _fsync(path: Path) -> None:
    """Put ``path`` (a file or a folder) on stable storage; a missing one is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        log.warning("could not sync %s: %s", path, exc)
    finally:
        os.close(fd)


class ModelStore:
    """Thread-safe; keeps the last ``keep`` rounds (on disk once written)."""

    def __init__(self, data_dir: Path, keep: int = 2, training: str | None = None) -> None:
        """``training``: the training's contract address; a latest model of another training
        (``latest.json`` names it) is not this one's."""
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.training = training.lower() if training else None
        self._models: dict[int, _Entry] = {}
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._written = 0  # the newest round in latest.safetensors
        self._writer: threading.Thread | None = None
        # told the round whose model was just written: whoever still serves it from the memory
        # it came in switches to the file (called on the writer thread, outside the lock)
        self.on_written: Callable[[int], None] | None = None
        self._load_latest()

    @property
    def _meta_path(self) -> Path:
        return self.dir / "latest.json"

    @property
    def _data_path(self) -> Path:
        return self.dir / "latest.safetensors"

    def _round_path(self, round: int) -> Path:
        return self.dir / f"round-{round}.safetensors"

    def _load_latest(self) -> None:
        try:
            meta = json.loads(self._meta_path.read_text())
            data = serde.map_file(self._data_path)
        except (OSError, ValueError):
            return
        digest = bytes.fromhex(meta.get("digest", ""))
        if (meta.get("training") or None) != self.training:
            log.info("%s holds round %s of training %s, not of this one (%s): starting afresh",
                     self._data_path, meta.get("round"), meta.get("training") or "(unnamed)",
                     self.training or "(unnamed)")
            return
        if serde.digest(data) == digest:  # a torn write is ignored, not trusted
            # the mapping, not the name: latest.safetensors is replaced when a newer round is
            # written, the mapped file stays what it was
            self._models[int(meta["round"])] = _Entry(digest, data, self._data_path)
            self._written = int(meta["round"])

    def put(self, round: int, digest: bytes, data: Any) -> None:
        with self._cond:
            held = self._models.get(round)
            if held is not None and held.digest == digest:
                return
            self._models[round] = _Entry(digest, data)
            for old in sorted(self._models)[: -self.keep]:
                self._drop(self._models.pop(old))
            self._cond.notify_all()
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_pending, name="store-writer",
                                                daemon=True)
                self._writer.start()

    def _drop(self, entry: _Entry) -> None:
        """Forget an old round: its file goes (mappings handed out keep their bytes)."""
        if entry.path is not None and entry.path != self._data_path:
            try:
                entry.path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove %s: %s", entry.path, exc)

    def _write_pending(self) -> None:
        while True:
            with self._cond:
                todo = sorted(r for r, e in self._models.items() if e.path is None)
                if not todo:
                    self._writer = None
                    self._cond.notify_all()
                    return
                # Only the newest is written: an older one still unwritten is let go rather than
                # kept in memory or written late (peers that need it pull it from its members).
                for old in todo[:-1]:
                    del self._models[old]
                round = todo[-1]
                entry = self._models[round]
                data = entry.data
            try:
                path = self._write(round, entry.digest, data)
            except OSError as exc:  # the in-memory copy still serves; say why the disk did not
                log.warning("could not save round %d's model to %s: %s", round, self.dir, exc)
                path = None
            with self._cond:
                if self._models.get(round) is entry:
                    if path is None:
                        self._writer = None  # keep it in memory; a later put tries again
                        self._cond.notify_all()
                        return
                    entry.path, entry.data = path, None  # served from the file from now on
                elif path is not None:
                    path.unlink(missing_ok=True)  # dropped or replaced while being written
                    path = None
            del data
            if path is not None and self.on_written is not None:
                try:
                    self.on_written(round)
                except Exception:  # the memory stays held a little longer; the model is stored
                    log.exception("after writing round %d's model", round)

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until the newest model is written and on stable storage (False if still writing
        after ``timeout``). Rounds are written without syncing (a crash of the process loses
        nothing; a crash of the host may lose the newest file, which a restart then ignores by
        its digest and pulls again); the final model is synced here."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._writer is None, timeout=timeout):
                return False
        with self._write_lock:
            for path in (self._data_path, self._meta_path, self.dir):  # the dir: the renames
                _fsync(path)
        return True

    def close(self) -> None:
        self.flush()

    def _write(self, round: int, digest: bytes, data: Any) -> Path:
        """``round-<r>.safetensors`` by an atomic rename; if it is the newest round written, also
        ``latest.safetensors`` then its metadata (an older round never overwrites a newer one)."""
        path = self._round_path(round)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:  # no fsync per round: flush() syncs what must survive
            f.write(data)
        os.replace(tmp, path)
        with self._write_lock:
            if round < self._written:
                return path
            tmp = self.dir / "latest.safetensors.tmp"
            tmp.unlink(missing_ok=True)
            try:
                os.link(path, tmp)
            except OSError:  # a filesystem without hard links: a copy
                with open(tmp, "wb") as f:
                    f.write(data)
            os.replace(tmp, self._data_path)
            meta = {"round": round, "digest": digest.hex(), "training": self.training}
            tmp = self.dir / "latest.json.tmp"
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, self._meta_path)
            self._written = round
        return path

    def _model(self, round: int) -> StoredModel | None:
        """Under the lock: the model of ``round`` (a fresh mapping of its file once written)."""
        entry = self._models.get(round)
        if entry is None:
            return None
        if entry.data is not None:
            return StoredModel(round, entry.digest, entry.data)
        assert entry.path is not None
        try:
            return StoredModel(round, entry.digest, serde.map_file(entry.path))
        except OSError as exc:
            log.warning("round %d's model file %s is unreadable (%s); pull it again", round,
                        entry.path, exc)
            del self._models[round]
            return None

    def get(self, round: int) -> StoredModel | None:
        with self._cond:
            return self._model(round)

    def wait(self, round: int, timeout: float) -> StoredModel | None:
        with self._cond:
            self._cond.wait_for(lambda: round in self._models, timeout=timeout)
            return self._model(round)

    def latest(self) -> StoredModel | None:
        with self._cond:
            return self._model(max(self._models)) if self._models else None
