"""Bad configs fail at load with one line and exit 2; --dry-run plans without the cluster's files."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cram_ray.config import ConfigError, environment_problems, load_config

ROOT = Path(__file__).resolve().parents[2]
PRESET_7B = str(ROOT / "workflows" / "configs" / "llava-1.5-7b-coin.yaml")


@pytest.mark.parametrize("override, fragment", [
    ("model.vision_heads=0", "model.vision_heads: expected >= 1"),
    ("model.text_heads=3", "model.text_hidden: expected a multiple of model.text_heads=3"),
    ("train.eval_batch_size=0", "train.eval_batch_size: expected >= 1"),
    ("train.lr=nan", "train.lr: expected a finite number > 0"),
    ("train.lr=-1", "train.lr: expected a finite number > 0"),
    ("model.base.lr=.inf", "model.base.lr: expected a finite number > 0"),
    ("train.grad_accum=3", "multiple of train.num_workers x train.grad_accum"),
    ("method.target_modules=[]", "method.target_modules: expected a non-empty list"),
    ("method.lora_ranks={olora: 0}", "method.lora_ranks.olora"),
    ("train.gpu=-4", "train.gpu"),
])
def test_bad_values_fail_at_load_with_one_line(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_workers_times_accumulation_must_divide_the_batch():
    with pytest.raises(ConfigError, match="8 x 2 = 16"):
        load_config(PRESET_7B, ["train.grad_accum=2", "train.batch_size=40"])
    assert load_config(PRESET_7B, ["train.grad_accum=2", "train.batch_size=48"]).train.micro_batch == 3


def test_method_rank_follows_the_method():
    cfg = load_config(PRESET_7B)
    assert [cfg.replace(**{"method.name": m}).method.rank for m in ("lora_ft", "moelora", "olora", "hide")] == [64, 8, 8, 8]
    moelora = cfg.replace(**{"method.name": "moelora"}).method
    assert moelora.moelora.experts * (moelora.moelora.expert_rank or moelora.rank) == 64  # the reference's total rank


def test_environment_problems_name_what_is_missing(tmp_path):
    cfg = load_config(PRESET_7B, [f"storage={tmp_path}/runs"])
    problems = environment_problems(cfg)
    assert any(p.startswith("model.path:") for p in problems)
    assert any(p.startswith("data.benchmark:") for p in problems)
    assert not any(p.startswith("storage:") for p in problems)
    gpu = [p for p in environment_problems(cfg.replace(**{"train.executor": "local"})) if p.startswith("train.use_gpu")]
    assert bool(gpu) == (not torch.cuda.is_available())
    (tmp_path / "a-file").write_text("")
    under_a_file = cfg.replace(storage=str(tmp_path / "a-file" / "runs"))  # no directory can be made there, even as root
    assert any(p.startswith("storage:") for p in environment_problems(under_a_file))


def _stream(*args):
    return subprocess.run([sys.executable, str(ROOT / "workflows" / "stream.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                                 "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})


def test_dry_run_of_the_7b_preset_fits_and_a_bad_batch_fails_at_load(tmp_path):
    ok = _stream("--config", PRESET_7B, "--dry-run", "--set", f"storage={tmp_path}")
    assert ok.returncode == 0, ok.stderr
    assert "per-GPU peak" in ok.stdout and "fits" in ok.stdout and "warning: model.path" in ok.stdout
    bad = _stream("--config", PRESET_7B, "--dry-run", "--set", "train.num_workers=8", "--set", "train.batch_size=4")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().count("\n") == 0 and "train.batch_size" in bad.stderr and "Traceback" not in bad.stderr
    small = _stream("--config", PRESET_7B, "--dry-run", "--set", f"storage={tmp_path}", "--set", "train.gpu=l4-24gb")
    assert small.returncode == 2 and "DOES NOT FIT" in small.stdout and small.stderr.count("\n") == 1


@pytest.mark.parametrize("script, extra", [("compare.py", ["--methods", "cram,lora_ft", "--seeds", "0,1"]),
                                           ("tune.py", [])])
def test_compare_and_tune_dry_runs(tmp_path, script, extra):
    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "workflows" / script), "--config", PRESET_7B, "--dry-run",
                               "--out", str(tmp_path), "--set", f"storage={tmp_path}", *extra, *args],
                              capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    ok = run()
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("per-GPU peak") == (2 if script == "compare.py" else 1)
    assert run("--set", "train.gpu=t4-16gb").returncode == 2
    assert not list(tmp_path.iterdir())  # nothing ran
