"""The demo's data: scikit-learn's bundled breast-cancer set split into uneven hospital shards.

``hospital_splits`` draws one stratified test set that every model is scored on, and splits the rest
into ``n_hospitals`` shards of different sizes (shares proportional to n, n-1, ..., 1: for three
hospitals 1/2, 1/3 and 1/6 of the training data). The smallest hospital, a screening clinic, has
almost no malignant cases (``SCARCE_MALIGNANT`` = 1); the others share the remaining malignant cases
in proportion to their size. ``pooled()`` is the union of the shards, for the central baseline.

Labels: ``y = 1`` means malignant (``MALIGNANT``), the positive class of every score
(scikit-learn's own target is the other way round: 0 = malignant).

Preprocessing is a fixed, data-independent transform, ``log1p`` of the (non-negative) features, so
no statistic of the pooled data reaches any hospital. The features still differ in scale by two
orders of magnitude after it; the model normalises them itself with an input BatchNorm layer whose
running statistics each hospital learns from its own batches and the swarm merges like any other
parameter (see :mod:`swarmnode.demo.model`).

Shards travel as ``.npz`` files (``save_shard``/``load_shard``, never pickle) so each trainer
process reads its own shard only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

from swarmnode.errors import ConfigError

__all__ = [
    "MALIGNANT",
    "MIN_SHARD",
    "SCARCE_MALIGNANT",
    "DemoData",
    "Shard",
    "class_ratio_splits",
    "hospital_splits",
    "load_shard",
    "preprocess",
    "save_shard",
    "shard_sizes",
]

MALIGNANT = 1  # label of the positive class
SCARCE_MALIGNANT = 1  # malignant cases in the scarce (smallest) hospital's shard
MIN_SHARD = 12  # fewest training samples a hospital may get


class Shard(NamedTuple):
    """One hospital's samples: features [n, 30] float32 and labels [n] int64 (1 = malignant)."""

    X: np.ndarray
    y: np.ndarray

    @property
    def malignant(self) -> int:
        """How many malignant cases the shard holds."""
        return int((self.y == MALIGNANT).sum())


@dataclass(frozen=True)
class DemoData:
    """Hospital shards and the shared, stratified test set."""

    hospitals: tuple[Shard, ...]
    X_test: np.ndarray
    y_test: np.ndarray
    names: tuple[str, ...]
    scarce: int  # index of the hospital with almost no malignant cases (the smallest)
    feature_names: tuple[str, ...] = field(default=())

    @property
    def test(self) -> Shard:
        return Shard(self.X_test, self.y_test)

    def pooled(self) -> Shard:
        """Every hospital's training data together (the central baseline)."""
        return Shard(
            np.concatenate([h.X for h in self.hospitals]),
            np.concatenate([h.y for h in self.hospitals]),
        )


def preprocess(X: np.ndarray) -> np.ndarray:
    """The fixed feature transform: ``log1p`` of the non-negative raw features, as float32."""
    X = np.asarray(X, dtype=np.float64)
    if (X < 0).any():
        raise ConfigError("demo features must be non-negative (raw breast-cancer measurements)")
    return np.log1p(X).astype(np.float32)


def _apportion(total: int, shares: list[float]) -> list[int]:
    """Split ``total`` into whole numbers proportional to ``shares`` (largest remainder)."""
    raw = [total * s / sum(shares) for s in shares]
    counts = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def shard_sizes(n_train: int, n_hospitals: int) -> list[int]:
    """Training samples per hospital: shares proportional to n, n-1, ..., 1."""
    return _apportion(n_train, [float(n_hospitals - i) for i in range(n_hospitals)])


def hospital_splits(n_hospitals: int = 3, seed: int = 0, test_fraction: float = 0.25) -> DemoData:
    """Uneven hospital shards (the smallest with almost no malignant cases), shared test set."""
    if isinstance(n_hospitals, bool) or not isinstance(n_hospitals, int) or n_hospitals < 2:
        raise ConfigError(
            f"the demo needs at least 2 hospitals, not {n_hospitals!r}; use --nodes 2+"
        )
    if not 0.05 <= test_fraction <= 0.5:
        raise ConfigError(
            f"test_fraction={test_fraction!r} is out of range; use a fraction between 0.05 and 0.5"
        )
    bunch = load_breast_cancer()
    X = preprocess(bunch.data)
    y = (bunch.target == 0).astype(np.int64)  # scikit-learn: 0 = malignant; here 1 = malignant
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed
    )
    sizes = shard_sizes(len(train_idx), n_hospitals)
    if sizes[-1] < MIN_SHARD:
        most = max(
            (n for n in range(2, n_hospitals) if shard_sizes(len(train_idx), n)[-1] >= MIN_SHARD),
            default=2,
        )
        raise ConfigError(
            f"{n_hospitals} hospitals would leave the smallest with {sizes[-1]} training samples "
            f"(at least {MIN_SHARD} needed); use at most {most} hospitals or a smaller "
            "test_fraction"
        )
    rng = np.random.default_rng(seed)
    malignant = rng.permutation(train_idx[y[train_idx] == MALIGNANT])
    benign = rng.permutation(train_idx[y[train_idx] != MALIGNANT])
    scarce = n_hospitals - 1
    # The scarce hospital takes SCARCE_MALIGNANT malignant cases; the others share the rest of the
    # malignant cases in proportion to their size, and every hospital fills up with benign ones.
    m_counts = _apportion(len(malignant) - SCARCE_MALIGNANT, [float(s) for s in sizes[:scarce]])
    m_counts.append(SCARCE_MALIGNANT)
    return DemoData(
        hospitals=_deal(X, y, sizes, m_counts, malignant, benign, rng),
        X_test=X[test_idx],
        y_test=y[test_idx],
        names=tuple(f"hospital-{i + 1}" for i in range(n_hospitals)),
        scarce=scarce,
        feature_names=tuple(str(f) for f in bunch.feature_names),
    )


def _deal(X: np.ndarray, y: np.ndarray, sizes: list[int], m_counts: list[int],
          malignant: np.ndarray, benign: np.ndarray,
          rng: np.random.Generator) -> tuple[Shard, ...]:
    """Hospital i gets m_counts[i] of the malignant indices and fills up to sizes[i] with benign
    ones, in order, shuffled; every index is used once."""
    shards = []
    m_at = b_at = 0
    for size, m in zip(sizes, m_counts, strict=True):
        idx = np.concatenate([malignant[m_at:m_at + m], benign[b_at:b_at + size - m]])
        m_at, b_at = m_at + m, b_at + size - m
        shards.append(Shard(X[idx := rng.permutation(idx)], y[idx]))
    assert m_at == len(malignant) and b_at == len(benign)  # every training sample used once
    return tuple(shards)


def class_ratio_splits(n_hospitals: int = 3, seed: int = 0,
                       test_fraction: float = 0.25) -> DemoData:
    """The sizes of :func:`hospital_splits`, with uneven case mixes: the largest hospital (a
    screening programme) has few malignant cases (12% of its samples), the smallest has one, and
    the hospitals between take the rest of the malignant cases (a referral centre's mix)."""
    base = hospital_splits(n_hospitals, seed=seed, test_fraction=test_fraction)
    X = np.concatenate([h.X for h in base.hospitals])
    y = np.concatenate([h.y for h in base.hospitals])
    sizes = [len(h.y) for h in base.hospitals]
    rng = np.random.default_rng(seed + 1)
    malignant = rng.permutation(np.flatnonzero(y == MALIGNANT))
    benign = rng.permutation(np.flatnonzero(y != MALIGNANT))
    middle = list(range(1, n_hospitals - 1)) if n_hospitals > 2 else [1]
    counts = [0] * n_hospitals
    counts[0] = round(0.12 * sizes[0])
    if n_hospitals > 2:
        counts[-1] = SCARCE_MALIGNANT
    rest = len(malignant) - sum(counts)
    share = _apportion(rest, [float(sizes[i]) for i in middle])
    for i, k in zip(middle, share, strict=True):
        counts[i] = min(k, sizes[i] - 2)  # at least two benign cases everywhere
    counts[0] += len(malignant) - sum(counts)  # what the middle hospitals could not take
    shards = _deal(X, y, sizes, counts, malignant, benign, rng)
    return DemoData(hospitals=shards, X_test=base.X_test, y_test=base.y_test,
                    names=base.names, scarce=base.scarce, feature_names=base.feature_names)


def save_shard(path: str | Path, X: np.ndarray, y: np.ndarray) -> Path:
    """Write one shard as an uncompressed ``.npz`` with arrays ``X`` (float32) and ``y`` (int64)."""
    path = Path(path)
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ConfigError(
            f"a shard needs X of shape [n, features] and y of shape [n]; got {X.shape} and "
            f"{y.shape} for {path}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, X=X, y=y)
    return path


def load_shard(path: str | Path) -> Shard:
    """Read a shard written by :func:`save_shard` (``allow_pickle=False``: no code runs)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            X, y = archive["X"], archive["y"]
    except FileNotFoundError:
        raise ConfigError(f"shard file {path} does not exist; check the --shard path") from None
    except (KeyError, ValueError, OSError) as exc:
        raise ConfigError(
            f"{path} is not a demo shard (.npz with arrays X and y, no pickled objects): {exc}"
        ) from None
    if X.ndim != 2 or y.shape != (X.shape[0],) or X.dtype.kind != "f" or y.dtype.kind not in "iu":
        raise ConfigError(
            f"{path} holds X {X.shape} {X.dtype} and y {y.shape} {y.dtype}; a shard needs float X "
            "[n, features] and integer y [n]"
        )
    return Shard(X.astype(np.float32, copy=False), y.astype(np.int64, copy=False))
