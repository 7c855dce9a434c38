"""Remove what a runtime never loads from a virtual environment (used by the image builds).

    python slim.py /opt/swarmnode

torch's C++ headers, its own test suite and build tools, and pip's caches. torch_shm_manager
stays (DataLoader workers need it).
"""

import shutil
import sys
from pathlib import Path

venv = Path(sys.argv[1])
for site in venv.glob("lib/python3*/site-packages"):
    for rel in ("torch/include", "torch/test", "torch/share/cmake", "torchgen/packaged"):
        shutil.rmtree(site / rel, ignore_errors=True)
    tools = site / "torch" / "bin"
    if tools.is_dir():
        for f in tools.iterdir():
            if f.is_file() and f.name != "torch_shm_manager":
                f.unlink()
    for a in site.rglob("*.a"):
        a.unlink()
