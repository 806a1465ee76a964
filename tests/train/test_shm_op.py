"""A single CPU rank's DeepSpeed engine neither builds nor loads the shared-memory all-reduce op."""
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parents[1]

SCRIPT = """
import json, os, socket, time
import torch.distributed as dist
from cram_ray.config import TrainConfig
from cram_ray.train.fit import engine_fit
from toys import batches, make
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
model, method = make()
t = time.time()
engine_fit(model, method, iter(batches(2)), 2, TrainConfig(batch_size=8, lr=1e-2, zero_stage=0), log_every=0)
from deepspeed.comm import comm
print(json.dumps({"seconds": time.time() - t, "shm_op": comm.cdb.shm_comm_op is not None}))
"""


def test_one_cpu_rank_builds_no_shm_op(tmp_path):
    ext = tmp_path / "extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext), "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shm_op"] is False
    built = [p.name for p in ext.iterdir()] if ext.exists() else []
    assert "deepspeed_shm_comm" not in built, built
