"""Write the digits example's data: scikit-learn's 8x8 digits split over N hospitals so that each
holds only some of the digits (hospital i lacks the digits c with c % N == i - 1), and one shared
test set with every digit. The same split as `swarmnode demo` (seed 0).

    python make_data.py [--hospitals 3] [--seed 0] [--out data]

Writes OUT/hospital-i/train.npz and test.npz (arrays X float32 [n, 64] and y int64; `.npz`
without pickled objects). Needs `pip install 'swarmnode[demo]'` (scikit-learn).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from swarmnode.demo.data import save_shard
from swarmnode.demo.digits import missing_classes_split


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hospitals", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    args = p.parse_args()
    data = missing_classes_split(args.hospitals, seed=args.seed)
    for name, (X, y) in zip(data.names, data.hospitals, strict=True):
        save_shard(args.out / name / "train.npz", X, y)
        save_shard(args.out / name / "test.npz", data.X_test, data.y_test)
        print(f"{name}: {len(y)} samples, digits {''.join(str(c) for c in sorted(set(y)))}")


if __name__ == "__main__":
    main()
