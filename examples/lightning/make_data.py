"""Write scikit-learn's handwritten digits as N sites' shards, each site seeing only some classes.

    python make_data.py                  # 3 sites: data/site-1 .. data/site-3
    python make_data.py --sites 2 --out /tmp/digits

Each site gets data/site-i/train.npz and data/site-i/test.npz with arrays X (float32 [n, 64],
the 8x8 pixels scaled to 0..1) and y (int64 [n], the digit), written with numpy's savez (no
pickles). The split is label-skewed: site i (from 1) never sees the digits c with c % N == i - 1,
so every site misses about 1/N of the classes (with 2 sites: site-1 only odd digits, site-2 only
even ones) and a model trained on one site alone cannot recognise them; every digit is at some
site. The test set is the same at every site: 300 held-out images of all ten digits.

Needs numpy and scikit-learn (its copy of the digits is bundled: nothing is downloaded).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

TEST_SIZE = 300


def split(sites: int, seed: int = 0) -> tuple[list[tuple[np.ndarray, np.ndarray]],
                                              tuple[np.ndarray, np.ndarray]]:
    """Per site (X, y) of its training shard, and the shared test set."""
    if sites < 2:
        raise SystemExit("--sites must be at least 2 (a swarm of one is local training)")
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    # a digit is shared by the N - 1 sites that do not miss it: its images are dealt to them in
    # turn, so the sites hold about the same number of images
    owner = np.empty(len(train), dtype=np.int64)
    dealt = np.zeros(10, dtype=np.int64)
    for k, label in enumerate(y[train]):
        holders = [s for s in range(sites) if s != label % sites]
        owner[k] = holders[dealt[label] % len(holders)]
        dealt[label] += 1
    shards = [(X[train[owner == i]], y[train[owner == i]]) for i in range(sites)]
    return shards, (X[test], y[test])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sites", type=int, default=3, help="number of sites [3]")
    p.add_argument("--out", type=Path, default=Path("data"), help="folder for site-i/ [data]")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split [0]")
    a = p.parse_args()
    shards, (X_test, y_test) = split(a.sites, a.seed)
    for i, (X, y) in enumerate(shards, start=1):
        d = a.out / f"site-{i}"
        d.mkdir(parents=True, exist_ok=True)
        np.savez(d / "train.npz", X=X, y=y)
        np.savez(d / "test.npz", X=X_test, y=y_test)
        print(f"{d}: {len(y)} training images of digits {sorted(set(y.tolist()))}, "
              f"{len(y_test)} test images of all digits")


if __name__ == "__main__":
    main()
