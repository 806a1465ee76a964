"""From a resolved config to a finished stream: executor, tracking, summary.json, plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from cram_ray.config import StreamConfig
from cram_ray.pipeline.driver import LocalExecutor, default_run_id, format_matrix, run_stream


def make_executor(cfg: StreamConfig):
    if cfg.train.executor == "ray":
        from cram_ray.pipeline.ray_executor import RayExecutor

        return RayExecutor(cfg)
    return LocalExecutor()


def run_and_report(cfg: StreamConfig, *, out: Path, run_id: Optional[str] = None) -> dict[str, Any]:
    """Run or resume the stream, then write ``out/summary.json`` and print the accuracy matrix."""
    out.mkdir(parents=True, exist_ok=True)
    run_id = run_id or default_run_id(cfg)
    executor = make_executor(cfg)
    print(f"[stream] run {run_id}: method {cfg.method.name}, executor {cfg.train.executor}, "
          f"storage {cfg.storage}", flush=True)
    summary = run_stream(cfg, run_id=run_id, executor=executor)
    summary["run_id"] = run_id
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(format_matrix(summary), flush=True)
    return summary
