"""A GPU system check: a short stream of the 7B preset's path on a random-init Llava at 7B widths.

    python workflows/gpu_check.py [--out DIR] [--steps N] [--set key=value ...]

Builds LLaVA-1.5-7B's architecture (Llama-2-7B widths with 2 language layers, CLIP ViT-L/14 at
336 px; ``model.init=random``, so no checkpoint and no network), trains and evaluates two built-in
tasks through the same Ray Train / DeepSpeed ZeRO-2 / gradient-checkpointing path as the 7B
preset, then prints steps/s, tokens/s, the peak GPU memory next to the plan's estimate, and the
accuracy matrix (near chance: the weights are random; the check is that everything runs).
``cluster/gpu_check.sh`` runs it on one GPU; tests run it on CPU at tiny shapes via ``--set``.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from cram_ray.cli import fail_cleanly, resolve_config

PRESET = Path(__file__).resolve().parent / "configs" / "llava-1.5-7b-coin.yaml"
CHECK = [  # the 7B preset, cut to one GPU, two language layers and two short built-in tasks
    "model.init=random", "model.text_layers=2", "data.benchmark=null",
    "data.builtin.tasks=[count, classify]", "data.builtin.test_per_task=64",
    "train.num_workers=1", "train.batch_size=4", "train.grad_accum=1", "train.eval_batch_size=16",
    "train.zero_stage=2", "train.gradient_checkpointing=true", "train.checkpoint_every=1000",
    "train.gpu=h100-80gb", "train.cpus_per_worker=4", "tracking.enabled=false", "method.cram.probe_ratio=0.2",
]


class PeakGPUMemory:
    """The device's highest used memory (all processes, as the driver reports it) above the level
    before the run, sampled every 0.2 s: the Train worker's and evaluator's peaks, CUDA context included."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.enabled = torch.cuda.is_available()
        self.base = self._used() if self.enabled else 0
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _used(self) -> int:
        free, total = self.torch.cuda.mem_get_info()
        return total - free

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._used())

    def __enter__(self) -> "PeakGPUMemory":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_check", help="output directory (storage, summary.json)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per task (default 40)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override after the check's own (repeatable)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    overrides = CHECK + [f"train.steps_per_task={args.steps}", f"data.builtin.train_per_task={max(64, 4 * args.steps)}",
                         f"storage={out / 'storage'}", *args.overrides]
    cfg = resolve_config(argparse.Namespace(config=str(PRESET), overrides=overrides, out=str(out)))
    from cram_ray.pipeline.run import run_and_report
    from cram_ray.plan import GIB, estimate_memory

    est = estimate_memory(cfg)
    t0 = time.time()
    with PeakGPUMemory() as memory:
        summary = run_and_report(cfg, out=out, run_id="gpu-check")
    wall = time.time() - t0
    tasks = len(summary["tasks"])
    secs = summary["stage_seconds"]
    steps = tasks * cfg.train.steps_per_task
    fit_seconds = secs["probe"] + secs["train"]  # the fused Train run's probe + train sub-stages
    tokens = steps * cfg.train.batch_size * est.seq
    report = {
        "tasks": tasks, "steps": steps, "wall_seconds": round(wall, 1),
        "steps_per_second": round(steps / fit_seconds, 3), "tokens_per_second": round(tokens / fit_seconds, 1),
        "estimated_peak_gib": round(est.peak / GIB, 2),
        "measured_peak_gib": round((memory.peak - memory.base) / GIB, 2) if memory.enabled else None,
        "accuracy_matrix": summary["accuracy_matrix"],
    }
    print(f"[gpu_check] {steps} steps in {fit_seconds:.1f}s of probe + train stages (worker start included): "
          f"{report['steps_per_second']} steps/s, {report['tokens_per_second']} tokens/s "
          f"({cfg.train.batch_size} x {est.seq} tokens per step)")
    print("[gpu_check] peak GPU memory: measured "
          + (f"{report['measured_peak_gib']} GiB" if memory.enabled else "n/a (no GPU)")
          + f", estimated {report['estimated_peak_gib']} GiB (cram_ray/plan.py)")
    print("[gpu_check] " + json.dumps(report))
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
