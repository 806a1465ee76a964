"""workflows/bench.py: each subcommand runs and prints what it promises."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflows"))

import bench  # noqa: E402


def test_rank_prints_seconds_and_ranks_within_the_bounds(capsys):
    assert bench.main(["rank", "--layers", "3", "--dim", "64", "--buf-rank", "8", "--hist", "1", "--hist-rank", "2",
                       "--rank-min", "2", "--rank-max", "5"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"total \d+\.\d+ s, per layer", out)
    lo, hi = map(int, re.search(r"ranks: min (\d+), max (\d+)", out).groups())
    assert 2 <= lo <= hi <= 5


def test_base_reports_every_question_with_true_and_shuffled_images(capsys, cache_dir):
    assert bench.main(["base", "--config", str(ROOT / "workflows/configs/smoke.yaml"),
                       "--set", f"data.cache_dir={cache_dir}", "--records", "40"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if re.search(r"\s\d+\s+\d+\.\d\s+\d+\.\d$", line)]
    total = [r for r in rows if r[0] == "all"]
    assert len(total) == 1 and int(total[0][1]) == 40
    assert sum(int(r[-3]) for r in rows if r[0] != "all") == 40
    assert all(0.0 <= float(r[-2]) <= 100.0 and 0.0 <= float(r[-1]) <= 100.0 for r in rows)
    assert re.search(r"answers that change when the images are shuffled: \d+\.\d%", out)


def test_probe_reports_an_accuracy_per_requested_task(capsys, cache_dir):
    assert bench.main(["probe", "--config", str(ROOT / "workflows/configs/smoke.yaml"),
                       "--set", f"data.cache_dir={cache_dir}", "--tasks", "count,classify"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["count", "classify"]
    for name, classes, train, test, acc, majority in rows:
        assert int(classes) >= 2 and int(train) == 48 and int(test) == 16
        assert 0.0 <= float(acc) <= 100.0 and 100.0 / int(classes) <= float(majority) + 1e-9 <= 100.0
