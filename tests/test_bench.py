"""workflows/bench.py: each subcommand runs and prints what it promises."""
import re
import sys

import pytest
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
    zero_shot = out.split("asked the mix's own question:")[1].splitlines()[2:]
    tasks = {line.split()[0]: (int(line.split()[-2]), float(line.split()[-1])) for line in zero_shot if line.strip()}
    assert set(tasks) == {"choice", "ocr", "classify", "compose", "unanswerable", "count"}
    assert tasks["unanswerable"][0] == 5 and all(n == 10 for t, (n, _) in tasks.items() if t != "unanswerable")
    assert all(0.0 <= acc <= 100.0 for _, acc in tasks.values())


def test_zero_shot_records_ask_mix_questions_the_base_can_answer():
    from cram_ray.config import load_config
    from cram_ray.data.builtin import UNANSWERABLE, make_example
    from cram_ray.data.pretrain_mix import pretrain_vocabulary_texts

    cfg = load_config(ROOT / "workflows/configs/smoke.yaml")
    vocab = set(pretrain_vocabulary_texts())
    pairs = bench.stream_canvas_records(cfg, 12)
    for task, r in pairs:
        assert r.instruction in vocab and r.answer in vocab  # mix questions, answers the mix emits
    by_task = {}
    for task, r in pairs:
        by_task.setdefault(task, []).append(r)
    # answers still mean the task's answer: the digit's numeral, the panel's position, no unanswerable
    classify = by_task["classify"]
    names = [make_example("classify", "test", i, cfg.data.builtin.image_size, "distinct", cfg.data.builtin.seed)[2]
             for i in range(len(classify))]
    assert [r.answer for r in classify] == [str(["zero", "one", "two", "three", "four", "five", "six", "seven",
                                                  "eight", "nine"].index(n)) for n in names]
    assert {r.answer for r in by_task["choice"]} == {"top left", "top right", "bottom left", "bottom right"}
    composed = [make_example("compose", "test", i, cfg.data.builtin.image_size, "distinct", cfg.data.builtin.seed)[2]
                for i in range(12)]
    assert [r.answer for r in by_task["compose"]] == [a.split()[0] for a in composed]  # the colour half
    assert len(by_task["unanswerable"]) == 6 and UNANSWERABLE not in {r.answer for r in by_task["unanswerable"]}


def test_probe_reports_an_accuracy_per_requested_task(capsys, cache_dir):
    assert bench.main(["probe", "--config", str(ROOT / "workflows/configs/smoke.yaml"),
                       "--set", f"data.cache_dir={cache_dir}", "--tasks", "count,classify"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["count", "classify"]
    for name, classes, train, test, acc, majority in rows:
        assert int(classes) >= 2 and int(train) == 48 and int(test) == 16
        assert 0.0 <= float(acc) <= 100.0 and 100.0 / int(classes) <= float(majority) + 1e-9 <= 100.0


def test_base_retrain_ships_a_verified_base_and_measures_both_precisions(capsys, tmp_path):
    from cram_ray.models.base import shipped_bases, verify_shipped

    small = ["model.base.steps=2", "model.base.vision_steps=2", "model.base.samples=16",
             "model.base.vision_samples=16", "model.base.text_samples=4", f"data.cache_dir={tmp_path / 'cache'}"]
    argv = ["base", "--retrain", "smoke", "--out", str(tmp_path / "assets"), "--records", "8"]
    assert bench.main(argv + [a for kv in small for a in ("--set", kv)]) == 0
    out = capsys.readouterr().out
    assert "(float32, as trained)" in out and "(shipped float16)" in out
    assert len([line for line in out.splitlines() if line.startswith("all ")]) == 2
    shipped = tmp_path / "assets" / "smoke"
    assert verify_shipped(shipped)["model"]["base"]["steps"] == 2
    assert list(shipped_bases(tmp_path / "assets").values()) == [shipped]


def test_step_times_every_variant_on_the_same_batches(capsys, cache_dir, tmp_path):
    assert bench.main(["step", "--config", str(ROOT / "workflows/configs/smoke.yaml"), "--set",
                       f"data.cache_dir={cache_dir}", "--steps", "2", "--rounds", "1", "--tmp", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    times = {name.strip(): float(ms) for name, ms in re.findall(r"^(.+?)\s+(\d+\.\d) ms/step$", out, re.M)}
    assert set(times) == {"model's own loss, separate routing pass", "answer-only logits, separate routing pass",
                          "answer-only logits, shared routing pass", "answer-only logits, shared pass, feature cache"}
    assert all(ms > 0 for ms in times.values())
    found = re.search(r"^ratio shared pass / own loss (\d+\.\d+), feature cache / shared pass (\d+\.\d+) "
                      r"\((\d+)% of images from the cache\)$", out, re.M)
    shared, cached, hit_rate = float(found.group(1)), float(found.group(2)), int(found.group(3))
    assert shared == pytest.approx(times["answer-only logits, shared routing pass"]
                                   / times["model's own loss, separate routing pass"], abs=0.02)
    assert cached == pytest.approx(times["answer-only logits, shared pass, feature cache"]
                                   / times["answer-only logits, shared routing pass"], abs=0.02)
    assert 0 <= hit_rate <= 100
    fill = re.search(r"^first epoch's features \((\d+) batches\): (\d+\.\d+) s filling the cache one image per pass, "
                     r"(\d+\.\d+) s in batched passes$", out, re.M)
    assert int(fill.group(1)) >= 1 and float(fill.group(2)) > 0 and float(fill.group(3)) > 0


def test_omp_times_every_policy_each_round_and_reaps_its_load(capsys, cache_dir):
    import os

    before = {p for p in os.listdir("/proc") if p.isdigit()}
    assert bench.main(["omp", "--config", str(ROOT / "workflows/configs/smoke.yaml"), "--steps", "2",
                       "--rounds", "1", "--policies", "PASSIVE,spin", "--load", "1"]) == 0
    out = capsys.readouterr().out
    timed = re.findall(r"round 1 (PASSIVE|spin \d+)\s*: train stage\s+(\d+\.\d\d) s", out)
    assert [name for name, _ in timed] == ["PASSIVE", f"spin {bench.SPIN_COUNT}"]
    assert "1 busy processes beside" in out
    ratio = float(re.search(r"ratio spin \d+ / PASSIVE: (\d+\.\d+)", out).group(1))
    means = [float(s) for _, s in timed]
    lo, hi = (means[1] - 0.005) / (means[0] + 0.005), (means[1] + 0.005) / (means[0] - 0.005)  # printed to 0.01 s
    assert all(m > 0 for m in means) and lo - 0.001 <= ratio <= hi + 0.001
    # the busy process it started is gone
    leftover = [p for p in set(os.listdir("/proc")) - before if p.isdigit()
                and "while True: pass" in Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")]
    assert leftover == []


def test_omp_parses_its_policies_and_rejects_an_unknown_one():
    assert bench.omp_policies("PASSIVE,spin,spin=300,ACTIVE", "100") == {
        "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin 100": {"GOMP_SPINCOUNT": "100"},
        "spin 300": {"GOMP_SPINCOUNT": "300"}, "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"}}
    for bad in ("SLEEP", "spin=many", "PASSIVE=3"):
        with pytest.raises(SystemExit, match=f"unknown policy '{bad}'"):
            bench.omp_policies(f"PASSIVE,{bad}", "100")


def test_install_times_every_variant_and_counts_the_bytecode_each_writes(capsys, tmp_path):
    # a one-module wheel installed without an index: the bench's own steps, not the package's size
    import zipfile

    wheel = tmp_path / "tinypkg-0.1-py3-none-any.whl"
    files = {"tinypkg/__init__.py": "VALUE = 1\n",
             "tinypkg-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\n",
             "tinypkg-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files["tinypkg-0.1.dist-info/RECORD"] = "".join(f"{name},,\n" for name in [*files, "tinypkg-0.1.dist-info/RECORD"])
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    assert bench.main(["install", "--spec", str(wheel), "--constraints", "", "--imports", "tinypkg,json",
                       "--pip-args=--no-index", "--no-upgrade-pip", "--tmp", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"round 1 (\S+)\s*: install\s+\d+\.\d s \(([+-]\d+) bytecode files\)", out))
    assert set(rows) == {"compile", "no-compile", "precompile"}
    # pip compiled the module; without it nothing was; cram_ray.precompile wrote the imported one's
    # bytecode whatever PYTHONDONTWRITEBYTECODE says
    assert int(rows["compile"]) >= 1 and int(rows["no-compile"]) == 0 and int(rows["precompile"]) == 1
    assert re.search(r"ratio no-compile / compile: \d+\.\d{3}\nratio precompile / compile: \d+\.\d{3}$", out.strip())
    assert not list(tmp_path.glob("cram-bench-install-*"))


def test_install_command_compiles_unless_told_not_to(tmp_path):
    cmd = bench.install_command(tmp_path, ["-e", "x[dev]"], "c.txt", False, ["--no-index"])
    assert cmd[-4:] == ["-c", "c.txt", "-e", "x[dev]"] and "--no-compile" in cmd and "--no-index" in cmd
    assert "--no-compile" not in bench.install_command(tmp_path, ["x"], "", True, [])


def test_precompile_writes_bytecode_even_when_told_not_to_and_skips_missing_extras(tmp_path, monkeypatch):
    import os
    import subprocess

    (tmp_path / "freshmod.py").write_text("X = 1\n")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "cram_ray/precompile.py"), "freshmod", "not_installed_extra"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "__pycache__").glob("freshmod.*.pyc"))
    assert "skipped: not_installed_extra" in proc.stdout
    # a module that is there but imports something missing is an error, not a skip
    (tmp_path / "broken.py").write_text("import not_there_at_all\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from cram_ray.precompile import precompile

    setting = sys.dont_write_bytecode
    with pytest.raises(ModuleNotFoundError):
        precompile(("broken",))
    assert sys.dont_write_bytecode == setting  # the process's own setting, restored
