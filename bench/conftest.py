"""pytest setup for bench/: make `common` and `bench_attention` importable under any --import-mode."""

import sys
from pathlib import Path

BENCH_DIR = str(Path(__file__).resolve().parent)
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)
