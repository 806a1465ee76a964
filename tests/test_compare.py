"""Every registered method on the smoke stream, then workflows/compare.py over two of those streams.

The smoke streams are written where compare.py puts them (``<dir>/<method>/seed_0``) with the config
compare.py builds, so the comparison reads their summaries instead of training again.
"""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflows"))

import compare  # noqa: E402
import stream  # noqa: E402
from cram_ray.methods import REGISTRY  # noqa: E402

SMOKE = str(ROOT / "workflows/configs/smoke.yaml")
SUMMARY_KEYS = {"method", "benchmark", "tasks", "accuracy_matrix", "mft", "mfn", "maa", "bwt",
                "routing_accuracy", "params_added", "params_added_total", "stage_seconds", "mlflow_run_id"}
ROUTED = {"cram", "hide", "same", "oracle", "modalprompt"}  # methods that make a routing decision per sample


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    return tmp_path_factory.mktemp("streams")


def _common(cache_dir):
    return ["--config", SMOKE, "--executor", "local", "--set", f"data.cache_dir={cache_dir}",
            "--set", "tracking.enabled=false"]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_runs_the_smoke_stream(streams, cache_dir, method):
    out = streams / method / "seed_0"
    assert stream.main([*_common(cache_dir), "--method", method, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["method"] == method
    assert [len(r) for r in summary["accuracy_matrix"]] == [1, 2, 3]
    assert all(0.0 <= v <= 100.0 for row in summary["accuracy_matrix"] for v in row)
    assert len(summary["params_added"]) == 3 and summary["params_added"][0] > 0
    assert summary["params_added_total"] == sum(summary["params_added"])
    if method in ROUTED:
        assert 0.0 <= summary["routing_accuracy"] <= 100.0 and len(summary["routing_confusion"]) == 3
    else:
        assert summary["routing_accuracy"] is None
    if method == "oracle":
        assert summary["routing_accuracy"] == 100.0


def _cells(markdown, method):
    header = next(line for line in markdown.splitlines() if line.startswith("| method |"))
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {method} |"))
    split = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    return dict(zip(split(header), split(row)))


@pytest.mark.slow
def test_compare_writes_json_table_and_plots_equal_to_the_summaries(streams, cache_dir):
    methods = ["oracle", "olora"]
    argv = [*_common(cache_dir), "--methods", ",".join(methods), "--seeds", "0", "--out", str(streams)]
    assert compare.main(argv) == 0
    summaries = json.loads((streams / "compare.json").read_text())
    assert [s["method"] for s in summaries] == methods
    for name in ("compare.md", "compare_bars.png", "accuracy_matrices.png"):
        assert (streams / name).stat().st_size > 0
    md = (streams / "compare.md").read_text()
    for s in summaries:
        assert s == json.loads((streams / s["method"] / "seed_0" / "summary.json").read_text()) | {
            "run_dir": s["run_dir"], "label": s["method"]}
        cells = _cells(md, s["method"])
        for col, key in (("MFT", "mft"), ("MFN", "mfn"), ("MAA", "maa"), ("BWT", "bwt")):
            assert cells[col] == f"{s[key]:.1f}"
        assert cells["params added"] == str(s["params_added_total"])
        assert cells["routing acc."] == ("-" if s["routing_accuracy"] is None else f"{s['routing_accuracy']:.1f}")
        assert cells["stage time (s)"] == f"{compare.stage_time(s):.1f}"
        assert cells["seeds"] == "1"
        assert s["environment"]["packages"]["torch"]
    assert "10 steps per task for every method" in md
    # the summaries the streams above wrote carry the run ids of these configs: read, nothing ran
    # (those streams kept their ledgers in their own directories, not under the comparison's)
    assert not any((streams / s["run_id"]).exists() for s in summaries)
    # without its summary, a stream runs, then resumes through its ledger with every stage committed
    olora = streams / "olora" / "seed_0" / "summary.json"
    for rerun in (True, False):
        olora.unlink()
        assert compare.main(argv) == 0
        again = json.loads((streams / "compare.json").read_text())
        assert again[0] == summaries[0] and again[1]["accuracy_matrix"] == summaries[1]["accuracy_matrix"]
        assert bool(again[1]["stages_run"]) is rerun and (streams / summaries[1]["run_id"]).is_dir()
    # a summary under another run id (another config, benchmark or base) is not reused
    import shutil

    shutil.rmtree(streams / summaries[1]["run_id"])
    olora.write_text(json.dumps(json.loads(olora.read_text()) | {"run_id": "olora-0000000000"}))
    assert compare.main(argv) == 0
    kept = json.loads((streams / "compare.json").read_text())
    assert kept[1]["run_id"] == summaries[1]["run_id"] and kept[1]["stages_run"]


def test_an_unreadable_summary_is_not_reused(tmp_path, capsys):
    from cram_ray.pipeline.ledger import Storage

    (tmp_path / "cram" / "seed_0").mkdir(parents=True)
    (tmp_path / "cram" / "seed_0" / "summary.json").write_text('{"run_id": "cram-')  # cut short
    assert compare.finished_summary(Storage(str(tmp_path)), "cram", 0, cfg=None) is None
    assert "cram/seed_0/summary.json: not a summary" in capsys.readouterr().out
    (tmp_path / "cram" / "seed_0" / "summary.json").write_text("[]")
    assert compare.finished_summary(Storage(str(tmp_path)), "cram", 0, cfg=None) is None
    assert "cram/seed_0/summary.json: not a summary" in capsys.readouterr().out


def test_mean_and_std_over_seeds():
    def fake(method, seed, mfn, routing):
        return {"method": method, "seed": seed, "mft": 50.0, "mfn": mfn, "maa": 40.0, "bwt": -10.0,
                "routing_accuracy": routing, "params_added_total": 100,
                "stage_seconds": {"probe": 1.0, "train": 2.0, "startup": 9.0, "wall": 99.0}}

    rows = compare.method_rows([fake("a", 0, 10.0, None), fake("a", 1, 20.0, None), fake("b", 0, 30.0, 90.0)],
                               ["a", "b"])
    a, b = rows
    assert a["seeds"] == 2 and a["MFN"][0] == 15.0 and a["MFN"][1] == pytest.approx(7.0710678)
    assert a["routing acc."] is None and a["params added"] == 100 and a["stage time (s)"] == (3.0, 0.0)
    assert b["MFN"] == (30.0, None) and b["routing acc."] == (90.0, None)


def test_report_logs_to_an_mlflow_parent_run(tmp_path):
    from mlflow import MlflowClient

    from cram_ray.config import load_config

    cfg = load_config(SMOKE, [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    summary = {"method": "a", "benchmark": "builtin", "tasks": ["x", "y"], "accuracy_matrix": [[50.0], [20.0, 60.0]],
               "mft": 55.0, "mfn": 40.0, "maa": 45.0, "bwt": -30.0, "routing_accuracy": None,
               "params_added_total": 7, "stage_seconds": {"train": 1.5}, "environment": {}}
    from cram_ray.tracking.mlflow_tracker import ParentRun

    parent = ParentRun(cfg, tmp_path, "compare-test", {"compare.methods": "a"}, kind="compare")
    files = compare.report([summary], ["a"], [0], cfg, tmp_path / "out", "cmd", parent)
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["a.mfn"] == 40.0
    logged = {a.path for a in client.list_artifacts(parent.run_id)}
    assert set(files) <= logged


def test_a_parent_run_adopts_the_runs_its_store_holds(tmp_path):
    from mlflow import MlflowClient

    from cram_ray.config import load_config
    from cram_ray.tracking.mlflow_tracker import TAG_PARENT, ParentRun

    cfg = load_config(SMOKE, [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    parent = ParentRun(cfg, tmp_path, "compare-test", {}, kind="compare")
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    child = client.create_run(client.get_run(parent.run_id).info.experiment_id).info.run_id
    parent.adopt(child)
    parent.adopt("0" * 32)  # a kept summary's run, from a store that is gone: left out, no error
    assert client.get_run(child).data.tags[TAG_PARENT] == parent.run_id


def test_bad_input_fails_with_one_line(tmp_path, capsys):
    assert compare.main(["--methods", "oracle,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "method.name" in err and "nope" in err
    assert compare.main(["--seeds", "0,x", "--out", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert compare.main(["--methods", "oracle", "--set", "train.lrr=1", "--out", str(tmp_path)]) == 2
    assert "train.lrr" in capsys.readouterr().err
    assert not (tmp_path / "oracle").exists()


def test_variants_are_methods_with_settings_changed(tmp_path):
    assert compare.variant_overrides("cram") == []
    assert compare.variant_overrides("cram@router=rbf+lambda_dec=0") == ["method.cram.router=rbf",
                                                                        "method.cram.lambda_dec=0"]
    assert compare.variant_overrides("lora_ft@train.lr=1e-3") == ["train.lr=1e-3"]
    # a list value keeps its commas: two labels, and the override is the list
    labels = compare.parse_methods("cram,same@target_modules=[q_proj,v_proj]+freeze_old=true")
    assert labels == ["cram", "same@target_modules=[q_proj,v_proj]+freeze_old=true"]
    assert compare.variant_overrides(labels[1]) == ["method.same.target_modules=[q_proj,v_proj]",
                                                    "method.same.freeze_old=true"]
    args = compare.build_parser().parse_args(["--config", SMOKE, "--out", str(tmp_path)])
    cfg = compare.run_config(args, "cram@router=rbf", 3, [])
    assert cfg.method.name == "cram" and cfg.method.cram.router == "rbf" and cfg.train.seed == 3
    assert cfg.storage == str(tmp_path.resolve())  # one storage root: the benchmark is prepared once for all
    listed = compare.run_config(args, labels[1], 0, [])
    assert listed.method.same.target_modules == ["q_proj", "v_proj"] and listed.method.same.freeze_old
    fake = {"method": "cram", "mft": 50.0, "maa": 40.0, "bwt": -1.0, "routing_accuracy": 90.0,
            "params_added_total": 100, "stage_seconds": {"train": 2.0}}
    rows = compare.method_rows([{**fake, "mfn": 50.0, "label": "cram"},
                                {**fake, "mfn": 70.0, "label": "cram@router=rbf"}], ["cram", "cram@router=rbf"])
    assert [r["method"] for r in rows] == ["cram", "cram@router=rbf"]
    assert rows[1]["MFN"][0] == 70.0
    assert compare.main(["--methods", "cram@router", "--out", str(tmp_path)]) == 2
