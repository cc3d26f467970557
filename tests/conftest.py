"""Test-wide settings."""

import os

# Bitwise-reproducibility tests compare runs whose buffers sit at different
# addresses; MKL may choose kernels by alignment unless this is pinned.  It
# must be set before torch loads MKL, i.e. before any test module imports it.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")
