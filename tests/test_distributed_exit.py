"""A rank tears its process group down before the interpreter exits (drivekd/distributed.py): a group
left to the C++ destructors can abort a rank that finished its work ("terminate called without an
active exception", exit -6), and torchrun then reports the whole run as failed."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import atexit, torch.distributed as dist
from drivekd.distributed import Dist
d = Dist("cpu")
d.barrier()
assert dist.is_initialized()
atexit._run_exitfuncs()  # what the interpreter runs at exit, before finalization
print(f"rank {d.rank} initialized after exit handlers: {dist.is_initialized()}", flush=True)
"""


@pytest.mark.slow
def test_each_rank_destroys_its_process_group_at_exit(tmp_path):
    script = tmp_path / "exit.py"
    script.write_text(SCRIPT)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for rank in (0, 1):
        assert f"rank {rank} initialized after exit handlers: False" in p.stdout, p.stdout
