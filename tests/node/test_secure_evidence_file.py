"""The leader's evidence file is written past the page cache (node.secure._DirectFile): the same
bytes whatever the sizes of the writes and of the tail, and the file cut to its real length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from swarmnode.node.secure import _DirectFile


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, _DirectFile.SIZE,
                                  _DirectFile.SIZE + 5, 2 * _DirectFile.SIZE + 4097])
def test_direct_writes_give_the_bytes_written(tmp_path: Path, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "evidence.tmp"
    with _DirectFile(path) as f:
        at = 0
        for k in (1, 7, 100_000, 3 << 20):  # writes that cross the buffer and the blocks
            assert f.write(data[at: at + k]) == len(data[at: at + k])
            at += k
        f.write(memoryview(data)[at:])
    assert path.stat().st_size == size
    assert path.read_bytes() == data


def test_a_write_that_fails_closes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "evidence.tmp"
    with pytest.raises(RuntimeError), _DirectFile(path) as f:
        f.write(b"x" * 5000)
        raise RuntimeError("the evidence could not be read")
    with pytest.raises(ValueError, match="released"):
        f.write(b"more")  # its buffer is gone with it (and its descriptor closed)
