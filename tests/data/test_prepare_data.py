"""workflows/prepare_data.py as a user runs it: shards + index.json, or one error line and exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cram_ray.data.manifest import load_benchmark
from cram_ray.data.shards import read_shards

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "workflows" / "prepare_data.py"


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_writes_shards_and_index(bench, tmp_path):
    manifest = bench.write()
    out = tmp_path / "out"
    proc = _run(manifest, "--out", out, "--rows-per-shard", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["benchmark"] == "toy"
    assert index["tasks"] == [
        {"name": "colour", "metric": "lower_exact", "train": 3, "test": 1},
        {"name": "letter", "metric": "option_letter", "train": 1, "test": 1},
    ]
    assert sorted(p.name for p in (out / "colour" / "train").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    bench_data = load_benchmark(manifest)
    for task in bench_data.tasks:
        for split in ("train", "test"):
            assert read_shards(out / task.name / split) == task.records(split)


def test_bad_manifest_exits_2_with_one_line(bench, tmp_path):
    bench.json["json/letter_test.json"][0]["conversations"] = [{"from": "human", "value": "<image>\nPick."}]
    proc = _run(bench.write(), "--out", tmp_path / "out")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "letter_test.json" in lines[0] and "'l2'" in lines[0] and "no answer" in lines[0]
    assert not (tmp_path / "out" / "index.json").exists()


def test_missing_manifest_exits_2(tmp_path):
    proc = _run(tmp_path / "none.yaml", "--out", tmp_path / "out")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "none.yaml" in proc.stderr
