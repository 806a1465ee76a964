"""A task's probe -> allocate -> train as ONE Ray Train run: 2 workers, DeepSpeed ZeRO-2, checkpoints,
and recovery from a killed worker (it ends with the same weights as an uninterrupted run)."""
import json

import pytest

from cram_ray.pipeline.context import StageContext
from cram_ray.pipeline.driver import prepare_data
from cram_ray.pipeline.ray_executor import RayExecutor
from cram_ray.train.trainer import FAULT_ENV, runs_root

from ray_helpers import smoke_config

pytestmark = pytest.mark.ray

TWO_WORKERS_ZERO2 = ("train.num_workers=2", "train.zero_stage=2", "train.cpus_per_worker=1",
                     "train.max_failures=2", "data.builtin.tasks=[count]")


def _context(storage, cache_dir, run_id):
    cfg = smoke_config(storage, cache_dir, *TWO_WORKERS_ZERO2)
    return StageContext(cfg, run_id, prepare_data(cfg, run_id))


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory, cache_dir):
    storage = tmp_path_factory.mktemp("fused")
    ctx = _context(storage, cache_dir, "plain")
    executor = RayExecutor(ctx.cfg)
    results = {stage: executor.run(ctx, 0, stage) for stage in ("probe", "allocate", "train")}
    return ctx, executor, results


def test_one_train_run_commits_probe_allocate_and_train(uninterrupted):
    ctx, executor, results = uninterrupted
    assert len(executor.timings) == 1 and executor.timings[0]["stages"] == ["probe", "allocate", "train"]
    probe, allocate, train = results["probe"], results["allocate"], results["train"]
    assert probe.metrics["steps"] == 2 and set(probe.metrics["loss"]) == {"ce"}
    assert allocate.metrics["slot"] == 0 and allocate.metrics["rank_max"] >= 1
    assert train.metrics["steps"] == 8 and train.metrics["loss"]["ce"] > 0
    for stage, result in results.items():
        assert ctx.ledger.verify(0, stage).to_json() == result.to_json()
        assert (ctx.storage.local_path(ctx.ledger.rel(0, stage)) / "state.safetensors").is_file()


def test_checkpoints_hold_the_whole_optimizer_state_as_safetensors_only(uninterrupted):
    from safetensors.torch import load_file

    ctx, _, _ = uninterrupted
    run_dir = ctx.storage.local_path(f"{ctx.run_id}/train_runs") / "task_0"
    assert str(run_dir.parent) == runs_root(ctx)
    ckpts = sorted(p for p in run_dir.iterdir() if p.name.startswith(("probe-", "train-")))
    assert [p.name for p in ckpts] == ["train-step000005"]  # every 5 steps, none at a fit's last step
    files = {p.relative_to(ckpts[0]).as_posix() for p in ckpts[0].rglob("*") if p.is_file()}
    # no DeepSpeed (pickled) files: ZeRO-2's two partitions were gathered into whole tensors
    assert files == {"trainable.safetensors", "optimizer.safetensors", "progress.json", "fused.json"}
    params = load_file(str(ckpts[0] / "trainable.safetensors"))
    state = load_file(str(ckpts[0] / "optimizer.safetensors"))
    assert set(state) == {f"{n}::{k}" for n in params for k in ("exp_avg", "exp_avg_sq", "master")}
    assert all(state[f"{n}::master"].shape == p.shape for n, p in params.items())
    meta = json.loads((ckpts[0] / "fused.json").read_text())
    assert meta["stage"] == "train" and meta["step"] == 5


def test_a_killed_worker_resumes_from_its_checkpoint_with_identical_results(uninterrupted, tmp_path_factory,
                                                                            cache_dir, monkeypatch):
    ref_ctx, _, ref = uninterrupted
    storage = tmp_path_factory.mktemp("fault")
    flag = storage / "crashed.json"
    monkeypatch.setenv(FAULT_ENV, json.dumps({"stage": "train", "step": 5, "rank": 1, "flag": str(flag)}))
    ctx = _context(storage, cache_dir, "plain")  # same run id: same seeds, own storage
    executor = RayExecutor(ctx.cfg)
    results = {stage: executor.run(ctx, 0, stage) for stage in ("probe", "allocate", "train")}
    assert flag.is_file(), "the fault hook did not fire"
    crashed_at = json.loads(flag.read_text())["time"]
    # the probe was committed before the crash and not redone by the restarted workers
    assert json.loads((storage / "plain/task_0/probe/_DONE.json").read_text())["finished_at"] < crashed_at
    assert len(executor.timings) == 1
    for stage in ("probe", "allocate", "train"):
        a = (storage / f"plain/task_0/{stage}/state.safetensors").read_bytes()
        b = ref_ctx.storage.local_path(f"plain/task_0/{stage}").joinpath("state.safetensors").read_bytes()
        assert a == b, stage
    assert results["train"].metrics["loss"] == pytest.approx(ref["train"].metrics["loss"], rel=1e-9)
