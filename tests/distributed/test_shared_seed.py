"""`l4compile.dist.shared_seed`: the ranks of a sampled run without --seed draw with one seed (rank 0's, broadcast),
since every rank must pick the same tokens. Two real processes on gloo."""
from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import json, os, sys
import torch.distributed as dist
from l4compile.dist import shared_seed
dist.init_process_group("gloo")
seeds = [shared_seed({"device": "cpu"}) for _ in range(2)]
with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(seeds, f)
dist.destroy_process_group()
"""


def test_ranks_share_one_fresh_seed(tmp_path):
    script = tmp_path / "seed.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert a == b                          # the same on both ranks
    assert a[0] != a[1]                    # and fresh at every call
    assert all(0 <= s < 2**56 for s in a)
