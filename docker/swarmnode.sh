#!/bin/sh
# The `swarmnode` command in the images (swarmnode is unpacked on PYTHONPATH, not pip-installed).
exec python -m swarmnode "$@"
