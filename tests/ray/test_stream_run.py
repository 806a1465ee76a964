"""One Ray Train run for the whole stream (train.run_span: stream): the driver follows its stages as it
commits them, its outputs equal those of one Train run per task, and a worker killed in a later task
restarts the run without redoing what it committed."""
import json
import time

import pytest

from cram_ray.pipeline.driver import run_stream
from cram_ray.pipeline.ray_executor import RayExecutor
from cram_ray.train.trainer import FAULT_ENV, STREAM_RUN

from ray_helpers import STAGES, output_pairs, smoke_config

pytestmark = pytest.mark.ray

TASKS = ("data.builtin.tasks=[count,classify]", "train.max_failures=2")


def _stream(storage, cache_dir, *overrides):
    """(summary, executor, wall-clock time of each on_task call) of a two-task smoke stream on Ray."""
    cfg = smoke_config(storage, cache_dir, *TASKS, *overrides)
    executor = RayExecutor(cfg)
    reported: dict[int, float] = {}
    summary = run_stream(cfg, run_id="s", executor=executor, on_task=lambda t, _: reported.setdefault(t, time.time()))
    return summary, executor, reported


def _finished(storage, task, stage):
    return json.loads((storage / f"s/task_{task}/{stage}/_DONE.json").read_text())["finished_at"]


def _same_outputs(a, b):
    pairs = list(output_pairs(a / "s", b / "s", 2))
    assert len(pairs) == 2 * (4 * 2 + 1)  # states of four stages and the predictions, per task
    for t, stage, fa, fb in pairs:
        assert fa.read_bytes() == fb.read_bytes(), (t, stage, fa.name)


@pytest.fixture(scope="module")
def spanning(ray_cluster, tmp_path_factory, cache_dir):
    storage = tmp_path_factory.mktemp("span")
    summary, executor, reported = _stream(storage, cache_dir)
    return storage, summary, executor, reported


def test_one_train_run_holds_every_task_and_the_driver_follows_it(spanning):
    storage, summary, executor, reported = spanning
    assert len(executor.timings) == 1 and executor.timings[0]["tasks"] == [0, 1]
    assert (storage / "s/train_runs" / STREAM_RUN).is_dir()
    # task 0's row reached on_task (where MLflow and Tune report) while the run was still training task 1
    assert reported[0] < _finished(storage, 1, "train")
    assert len(summary["accuracy_matrix"]) == 2 and summary["stages_run"] == [f"task_{t}/{s}" for t in range(2) for s in STAGES]
    # the worker's start is paid once: only the run's first stage has start-up time
    startups = {(t, s): json.loads((storage / f"s/task_{t}/{s}/_DONE.json").read_text())["result"]["startup_seconds"]
                for t in range(2) for s in STAGES}
    assert startups[(0, "probe")] > 0 and startups[(1, "probe")] < startups[(0, "probe")]


def test_a_run_per_task_gives_the_same_outputs(spanning, tmp_path, cache_dir):
    storage, summary, _, _ = spanning
    per_task, executor, _ = _stream(tmp_path, cache_dir, "train.run_span=task")
    assert [t["tasks"] for t in executor.timings] == [[0], [1]]
    assert per_task["accuracy_matrix"] == summary["accuracy_matrix"]
    _same_outputs(tmp_path, storage)


@pytest.mark.recovery
def test_a_worker_killed_in_the_second_task_restarts_the_run_with_the_same_outputs(spanning, tmp_path, cache_dir,
                                                                                    monkeypatch):
    storage, summary, _, _ = spanning
    flag = tmp_path / "crashed.json"
    monkeypatch.setenv(FAULT_ENV, json.dumps({"task": 1, "stage": "train", "step": 5, "rank": 0, "flag": str(flag)}))
    killed, executor, _ = _stream(tmp_path, cache_dir)
    assert flag.is_file(), "the fault hook did not fire"
    crashed_at = json.loads(flag.read_text())["time"]
    assert len(executor.timings) == 1  # the restart happened inside the one Train run
    # task 0 and task 1's first stages were committed before the crash and not redone
    assert max(_finished(tmp_path, 0, s) for s in STAGES) < _finished(tmp_path, 1, "allocate") < crashed_at
    assert crashed_at < _finished(tmp_path, 1, "train")
    assert killed["accuracy_matrix"] == summary["accuracy_matrix"]
    _same_outputs(tmp_path, storage)


def test_tasks_read_together_split_into_each_tasks_own_rows(spanning, cache_dir):
    """The run's datasets come from one Ray Data execution over every task, split at the task
    boundaries: each part holds exactly its task's rows, in the order its own read gives."""
    from cram_ray.pipeline.context import StageContext, runtime
    from cram_ray.pipeline.driver import prepare_data
    from cram_ray.train.trainer import stream_dataset, stream_datasets

    storage = spanning[0]
    cfg = smoke_config(storage, cache_dir, *TASKS)
    ctx = StageContext(cfg, "s", prepare_data(cfg, "s"))
    source = json.dumps({"settings": runtime(ctx).vlm.processor.settings()}, sort_keys=True)
    together = stream_datasets(ctx, [0, 1], source)
    for t in (0, 1):
        rows = together[t].to_pandas()
        alone = stream_dataset(ctx, t, source).to_pandas()
        assert set(rows["task_index"]) == {t} and len(rows) == ctx.tasks[t].n_train
        assert list(rows["instruction"]) == list(alone["instruction"])
        assert [list(x) for x in rows["target_ids"]] == [list(x) for x in alone["target_ids"]]
