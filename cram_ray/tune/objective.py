"""What a trial is scored by: the objective, and the study's results as CSV.

The objective is the configured stream metric (``tune.metric``, default MAA) reported after each
task's evaluation. Parameters added are reported beside it as the second metric; with
``tune.param_budget > 0`` a trial over budget is infeasible and scores below every feasible one
(worse the further over it is), so the searcher learns to stay inside the budget.
"""
from __future__ import annotations

import csv
import io
from typing import Any, Mapping, Sequence

from cram_ray.config import ConfigError, TuneConfig

OBJECTIVE = "objective"
METRICS = ("mft", "mfn", "maa", "bwt")  # what a stream reports after each task
PENALTY_BASE = 1000.0  # an infeasible trial scores beyond any feasible one by at least this


def check_metric(tune: TuneConfig) -> None:
    allowed = METRICS + ("params_added_total",)
    if tune.metric not in allowed:
        raise ConfigError(f"tune.metric: expected one of {', '.join(allowed)}, got {tune.metric!r}")


def objective(metrics: Mapping[str, Any], tune: TuneConfig) -> float:
    """The value Tune optimises (in direction ``tune.mode``) from a stream's running metrics."""
    value = float(metrics[tune.metric])
    budget = tune.param_budget
    if budget > 0:
        spent = float(metrics.get("params_added_total", 0))
        if spent > budget:
            excess = spent / budget - 1.0
            return -PENALTY_BASE * (1.0 + excess) if tune.mode == "max" else PENALTY_BASE * (1.0 + excess)
    return value


def results_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c) for c in columns})
    return buf.getvalue()

