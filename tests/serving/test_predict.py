"""workflows/predict.py on a finished short stream (tests/serving/conftest.py): the evaluation stage's answers and routing, from
the run directory alone; the committed-task rule; one-line failures."""
import json
import shutil

import pytest
from conftest import evaluation

import predict
from cram_ray.config import load_config
from cram_ray.data.records import DataError
from cram_ray.methods import make_method
from cram_ray.serving.model import task_index
from cram_ray.serving.run import committed_tasks, find_run, resolve_after_task, run_context


NAMES = ["count", "classify", "compose"]  # the smoke preset's tasks


def _predict(tmp_path, *argv):
    out = tmp_path / "pred.jsonl"
    assert predict.main([*argv, "--out", str(out)]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def _same_as_evaluation(rows, stored):
    assert [r["id"] for r in rows] == [s["id"] for s in stored]
    assert sum(bool(s["prediction"].strip()) for s in stored) >= len(stored) // 2  # answers in words, not all empty
    for r, s in zip(rows, stored):
        assert (r["answer"], r["routed_task"], r["reference"], r["score"]) == \
               (s["prediction"], s["routed_task"], s["answer"], s["score"]), r["id"]
        assert r["routed_task_name"] == NAMES[r["routed_task"]]
        assert r["weights"][r["routed_task_name"]] == max(r["weights"].values())
        assert abs(sum(r["weights"].values()) - 1.0) < 1e-5 and isinstance(r["group"], int)


def test_predict_on_the_benchmark_gives_the_evaluation_stages_answers(tmp_path, smoke_run, smoke_manifest):
    out, run_dir = smoke_run
    rows = _predict(tmp_path, "--run", str(out), "--input", str(smoke_manifest))  # <out> holding one run
    assert {r["after_task"] for r in rows} == {2}  # default: the last committed task
    _same_as_evaluation(rows, evaluation(run_dir, 2))
    first = _predict(tmp_path, "--run", str(run_dir), "--input", str(smoke_manifest), "--after-task", "0")
    task0 = [r for r in first if r["task"] == "count"]
    _same_as_evaluation(task0, evaluation(run_dir, 0))
    assert {r["routed_task"] for r in first} == {0}  # one expert so far: everything routes to it


def test_a_llava_json_input_without_answers_is_answered_and_routed(tmp_path, smoke_run, smoke_manifest):
    from cram_ray.data.manifest import load_benchmark

    task = load_benchmark(smoke_manifest).task("classify")
    entries = task.entries("test")[:3]
    records = [{"id": e.id, "image": e.image, "conversations": [{"from": "human", "value": "<image>\n" + e.instruction}]}
               for e in entries]
    path = tmp_path / "ask.json"
    path.write_text(json.dumps(records))
    rows = _predict(tmp_path, "--run", str(smoke_run[1]), "--input", str(path), "--image-root", "/")
    stored = {s["id"]: s for s in evaluation(smoke_run[1], 2)}
    for r in rows:
        assert "score" not in r and "reference" not in r and "task" not in r
        assert (r["answer"], r["routed_task"]) == (stored[r["id"]]["prediction"], stored[r["id"]]["routed_task"])


def test_only_a_committed_prefix_of_tasks_is_served(tmp_path, smoke_run):
    copy = tmp_path / "out"
    shutil.copytree(smoke_run[0], copy)
    ctx = run_context(find_run(str(copy / "s")))
    assert committed_tasks(ctx) == 3
    (copy / "s/task_1/aggregate/_DONE.json").unlink()  # task 1 being redone: task 2's state is stale
    assert committed_tasks(ctx) == 1 and resolve_after_task(ctx, None) == 0
    with pytest.raises(DataError, match=r"task 'compose' has not finished \(committed: count\)"):
        resolve_after_task(ctx, 2)


@pytest.mark.parametrize("argv, words", [
    (["--run", "{tmp}/nothing"], ["no such directory"]),
    (["--run", "{tmp}"], ["not a stream's run directory"]),
    (["--run", "{run}", "--after-task", "7"], ["--after-task 7", "tasks 0..2"]),
    (["--run", "{run}", "--task", "nope"], ["--task 'nope'", "count"]),
])
def test_bad_arguments_end_with_one_line_and_exit_2(tmp_path, smoke_run, smoke_manifest, capsys, argv, words):
    argv = [a.format(tmp=tmp_path, run=smoke_run[1]) for a in argv] + ["--input", str(smoke_manifest)]
    assert predict.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and all(w in err for w in words), err


def test_a_method_routing_by_the_true_task_needs_each_records_task():
    method = make_method(load_config(None, ["method.name=oracle"]))
    assert task_index(["a", "b"], "b", method) == 1
    with pytest.raises(DataError, match="routes by the true task"):
        task_index(["a", "b"], None, method)
    assert task_index(["a", "b"], None, make_method(load_config(None, ["method.name=cram"]))) == -1


@pytest.mark.ray
def test_ray_data_batch_inference_gives_the_in_process_answers(tmp_path, smoke_run, smoke_manifest):
    import ray

    local = _predict(tmp_path, "--run", str(smoke_run[1]), "--input", str(smoke_manifest))
    try:
        on_ray = _predict(tmp_path, "--run", str(smoke_run[1]), "--input", str(smoke_manifest), "--ray-threshold", "1")
    finally:
        ray.shutdown()
    assert [r["id"] for r in on_ray] == [r["id"] for r in local]
    for a, b in zip(on_ray, local):
        assert (a["answer"], a["routed_task"], a["group"]) == (b["answer"], b["routed_task"], b["group"])
        assert a["weights"] == pytest.approx(b["weights"], abs=1e-5)


def test_an_out_holding_several_runs_names_them(tmp_path, smoke_run):
    for name in ("a", "b"):
        (tmp_path / name / "data").mkdir(parents=True)
        shutil.copy(smoke_run[1] / "data/_DONE.json", tmp_path / name / "data/_DONE.json")
    with pytest.raises(DataError, match=r"holds 2 runs \(a, b\); pass --run .*/<run_id>"):
        find_run(str(tmp_path))
    assert find_run(str(tmp_path / "b")).run_id == "b"
