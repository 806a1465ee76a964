"""A task's five stages as ONE Ray Train run: 2 workers, DeepSpeed ZeRO-2, checkpoints, aggregate and
evaluate on the warm workers, and recovery from a worker killed in training or in evaluation (it ends
with the same outputs as an uninterrupted run)."""
import json
import shutil

import pytest

from cram_ray.pipeline.context import StageContext, task_records
from cram_ray.pipeline.driver import prepare_data
from cram_ray.pipeline.ray_executor import RayExecutor
from cram_ray.train.trainer import FAULT_ENV, runs_root

from ray_helpers import smoke_config

pytestmark = pytest.mark.ray

TWO_WORKERS_ZERO2 = ("train.num_workers=2", "train.zero_stage=2", "train.cpus_per_worker=1",
                     "train.max_failures=2", "data.builtin.tasks=[count]",
                     "train.eval_batch_size=4")  # 4 test batches: each rank evaluates two
STAGES = ("probe", "allocate", "train", "aggregate", "evaluate")
OUTPUTS = ("state.safetensors", "state.json", "predictions.jsonl")


def _context(storage, cache_dir, run_id):
    cfg = smoke_config(storage, cache_dir, *TWO_WORKERS_ZERO2)
    return StageContext(cfg, run_id, prepare_data(cfg, run_id))


def _same_outputs(ctx, ref_ctx, stages):
    """Every output file of ``stages`` byte-equal between two runs of task 0."""
    for stage in stages:
        for name in OUTPUTS:
            a = ctx.storage.local_path(ctx.ledger.rel(0, stage)) / name
            b = ref_ctx.storage.local_path(ref_ctx.ledger.rel(0, stage)) / name
            assert a.is_file() == b.is_file(), (stage, name)
            if a.is_file():
                assert a.read_bytes() == b.read_bytes(), (stage, name)


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory, cache_dir):
    storage = tmp_path_factory.mktemp("fused")
    ctx = _context(storage, cache_dir, "plain")
    executor = RayExecutor(ctx.cfg)
    results = {stage: executor.run(ctx, 0, stage) for stage in STAGES}
    return ctx, executor, results


def test_one_train_run_commits_all_five_stages(uninterrupted):
    ctx, executor, results = uninterrupted
    assert len(executor.timings) == 1 and executor.timings[0]["stages"] == list(STAGES)
    probe, allocate, train = results["probe"], results["allocate"], results["train"]
    assert probe.metrics["steps"] == 2 and set(probe.metrics["loss"]) == {"ce"}
    assert allocate.metrics["slot"] == 0 and allocate.metrics["rank_max"] >= 1
    assert train.metrics["steps"] == 8 and train.metrics["loss"]["ce"] > 0
    assert results["aggregate"].metrics["params_added"] > 0
    assert len(results["evaluate"].metrics["row"]) == 1 and results["evaluate"].metrics["confusion"] == [[16]]
    for stage, result in results.items():
        assert ctx.ledger.verify(0, stage).to_json() == result.to_json()
        has_state = (ctx.storage.local_path(ctx.ledger.rel(0, stage)) / "state.safetensors").is_file()
        assert has_state == (stage != "evaluate")
    predictions = ctx.storage.local_path(ctx.ledger.rel(0, "evaluate")) / "predictions.jsonl"
    assert [json.loads(line)["id"] for line in predictions.read_text().splitlines()] == \
        [r.id for r in task_records(ctx, 0, "test")]  # both ranks' answers, in the in-process order


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


def _run_killed(tmp_path_factory, cache_dir, monkeypatch, stage, step):
    """Task 0 with worker rank 1 killed once at (stage, step): (context, results, finish times, crash time)."""
    storage = tmp_path_factory.mktemp(f"fault_{stage}")
    flag = storage / "crashed.json"
    monkeypatch.setenv(FAULT_ENV, json.dumps({"stage": stage, "step": step, "rank": 1, "flag": str(flag)}))
    ctx = _context(storage, cache_dir, "plain")  # same run id: same seeds, own storage
    executor = RayExecutor(ctx.cfg)
    results = {s: executor.run(ctx, 0, s) for s in STAGES}
    assert flag.is_file(), "the fault hook did not fire"
    assert len(executor.timings) == 1  # the restart happened inside the one Train run
    finished = {s: json.loads((storage / f"plain/task_0/{s}/_DONE.json").read_text())["finished_at"] for s in STAGES}
    return ctx, results, finished, json.loads(flag.read_text())["time"]


@pytest.mark.recovery
def test_a_killed_worker_resumes_from_its_checkpoint_with_identical_results(uninterrupted, tmp_path_factory,
                                                                            cache_dir, monkeypatch):
    ref_ctx, _, ref = uninterrupted
    ctx, results, finished, crashed_at = _run_killed(tmp_path_factory, cache_dir, monkeypatch, "train", 5)
    # the probe was committed before the crash and not redone by the restarted workers
    assert finished["probe"] < crashed_at < finished["train"]
    _same_outputs(ctx, ref_ctx, STAGES)
    assert results["train"].metrics["loss"] == pytest.approx(ref["train"].metrics["loss"], rel=1e-9)


@pytest.mark.recovery
def test_a_worker_killed_in_evaluation_resumes_with_identical_results(uninterrupted, tmp_path_factory,
                                                                       cache_dir, monkeypatch):
    ref_ctx, _, ref = uninterrupted
    # rank 1 dies before its second test batch, after aggregate was committed
    ctx, results, finished, crashed_at = _run_killed(tmp_path_factory, cache_dir, monkeypatch, "evaluate", 1)
    assert max(finished[s] for s in STAGES[:4]) < crashed_at < finished["evaluate"]  # nothing redone
    _same_outputs(ctx, ref_ctx, STAGES)
    assert results["evaluate"].metrics == ref["evaluate"].metrics


def test_aggregate_and_evaluate_still_run_on_their_own_after_train(uninterrupted, tmp_path_factory):
    """The ledger contract: a run that finds train done but not aggregate runs the later stages alone
    (Ray Data actor pools here, no Train run) and gets the fused run's outputs."""
    ref_ctx, _, ref = uninterrupted
    copy = tmp_path_factory.mktemp("alone") / "storage"
    shutil.copytree(ref_ctx.storage.local_path(""), copy)
    ctx = StageContext(smoke_config(copy, ref_ctx.cfg.data.cache_dir, *TWO_WORKERS_ZERO2), "plain", ref_ctx.tasks)
    for stage in ("aggregate", "evaluate"):
        ctx.ledger.invalidate(0, stage)
    executor = RayExecutor(ctx.cfg)
    aggregate, evaluate = executor.run(ctx, 0, "aggregate"), executor.run(ctx, 0, "evaluate")
    assert executor.timings == []
    assert aggregate.metrics["params_added"] == ref["aggregate"].metrics["params_added"]
    assert aggregate.metrics["ranks"] == ref["aggregate"].metrics["ranks"]
    assert evaluate.metrics["row"] == ref["evaluate"].metrics["row"]
    _same_outputs(ctx, ref_ctx, ("evaluate",))
