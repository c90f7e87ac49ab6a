"""Fixtures that ship with drivekd so that anyone can run the whole pipeline offline: synthetic
driving scenes with questions of all three capabilities (`scenes`) and tiny random-weight
checkpoints of both families (`tiny_models`). `make demo`, the benchmarks and the test suite use
them; nothing in the library depends on them.
"""

from drivekd.demo.scenes import make_demo_data, summary_line
from drivekd.demo.tiny_models import make_tiny_models

__all__ = ["make_demo_data", "make_tiny_models", "summary_line"]
