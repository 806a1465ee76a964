"""Compare continual-learning methods on one benchmark: every method x seed, one table.

    python workflows/compare.py --methods cram,same,olora,moelora,hide,modalprompt,lora_ft,oracle [--seeds 0,1,2]
    python workflows/compare.py --methods cram,cram@router=rbf   # a variant: a method with settings changed
    python workflows/compare.py --methods same,same@target_modules=[q_proj,k_proj,v_proj,o_proj]   # a list value
                                [--config YAML] [--benchmark MANIFEST] [--out DIR|URI]
                                [--executor local|ray] [--restart] [--set key=value ...] [--dry-run]

Every (method, seed) stream runs, or resumes through its ledger ``DIR/<run_id>/``, and writes its
summary and plots to ``DIR/<method>/seed_<s>/``. A stream whose ``summary.json`` is already there with
the same run id (the same config, benchmark and code versions: see ``default_run_id``) is read, not
rerun, even when its ledger is gone: a long comparison can be run in parts on machines that keep
only the summaries (``--restart`` reruns every stream). The benchmark is prepared once for all of them in
``DIR/datasets/``. Every stream has the same config (``--set train.seed=<s>`` and the method name
are the only differences, so every method gets the same ``train.steps_per_task``). Then ``DIR/compare.json`` (the list of
summaries), ``DIR/compare.md`` (MFT, MFN, MAA, BWT, routing accuracy, parameters added and stage
time per method, mean ± std over seeds), ``DIR/compare_bars.png`` (MFN / BWT) and
``DIR/accuracy_matrices.png`` are written and, with tracking on, logged to an MLflow parent run
of which every stream's run is a child. ``DIR`` may be an object-store URI (``s3://bucket/cmp``):
the streams and the reports all go there.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Union


from cram_ray.cli import add_config_flags, add_restart_flag, dry_run, fail_cleanly, resolve_config
from cram_ray.config import ConfigError, StreamConfig, config_hash
from cram_ray.pipeline.ledger import Storage, normalize_location
from cram_ray.pipeline.outputs import tracking_place

DEFAULT_METHODS = "cram,same,olora,moelora,hide,modalprompt,lora_ft,oracle"  # all eight
STAGES = ("probe", "allocate", "train", "aggregate", "evaluate")
# table column -> how it is read from one summary
COLUMNS = {
    "MFT": lambda s: s["mft"],
    "MFN": lambda s: s["mfn"],
    "MAA": lambda s: s["maa"],
    "BWT": lambda s: s["bwt"],
    "routing acc.": lambda s: s.get("routing_accuracy"),
    "params added": lambda s: s["params_added_total"],
    "stage time (s)": lambda s: stage_time(s),
}
METRIC_KEYS = {"MFT": "mft", "MFN": "mfn", "MAA": "maa", "BWT": "bwt", "routing acc.": "routing_accuracy",
               "params added": "params_added_total", "stage time (s)": "stage_seconds"}  # column -> MLflow key


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated methods (default: {DEFAULT_METHODS})")
    parser.add_argument("--seeds", default="0", help="comma-separated integer seeds (default: 0)")
    add_restart_flag(parser)
    return add_config_flags(parser, out="runs/compare", out_help="output directory (one stream per method and seed)")


def parse_methods(text: str) -> list[str]:
    """``cram,same@target_modules=[q_proj,v_proj]`` -> two labels: a comma inside ``[...]`` belongs
    to a variant's list value."""
    methods = [m.strip() for m in re.split(r",(?![^\[]*\])", text) if m.strip()]
    if not methods:
        raise ConfigError(f"--methods: expected comma-separated method names, got {text!r}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods: a method is listed twice in {text!r}")
    return methods


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: expected distinct comma-separated integers, got {text!r}")
    return seeds


def method_of(label: str) -> str:
    """``cram@router=rbf`` -> ``cram``: the registered method a table entry runs."""
    return label.split("@", 1)[0]


def variant_overrides(label: str) -> list[str]:
    """``cram@router=rbf+lambda_dec=0`` -> ``["method.cram.router=rbf", "method.cram.lambda_dec=0"]``:
    a variant is a method with a few settings changed; an undotted key is one of the method's own."""
    if "@" not in label:
        return []
    name, spec = label.split("@", 1)
    out = []
    for item in spec.split("+"):
        if "=" not in item:
            raise ConfigError(f"--methods: variant '{label}': expected name@key=value[+key=value], got {item!r}")
        key, value = item.split("=", 1)
        out.append(f"{key if '.' in key else f'method.{name}.{key}'}={value}")
    return out


def label_of(summary: dict[str, Any]) -> str:
    return summary.get("label") or summary["method"]


def run_rel(method: str, seed: int) -> str:
    return f"{method}/seed_{seed}"


def run_dir(out: Storage, method: str, seed: int) -> str:
    """Where one stream of the comparison writes: a directory or URI under ``out``."""
    return out.location(run_rel(method, seed))


def run_config(args: argparse.Namespace, method: str, seed: int, extra: list[str]) -> StreamConfig:
    """The config of one stream: the shared one with the method, the seed and the run's own directory."""
    ns = argparse.Namespace(**vars(args))
    ns.method = method_of(method)
    ns.out = run_dir(Storage(args.out), method, seed)
    ns.overrides = list(args.overrides) + variant_overrides(method) + [f"train.seed={seed}"] + extra
    cfg = resolve_config(ns)
    # one storage root for every stream: the benchmark is prepared once, run ids keep the ledgers apart
    own_dir = cfg.storage == normalize_location(ns.out)  # storage came from --out, not from the config
    return cfg.replace(storage=normalize_location(args.out)) if own_dir else cfg


def finished_summary(out: Storage, method: str, seed: int, cfg: StreamConfig) -> Optional[dict[str, Any]]:
    """The summary an earlier comparison wrote for this very stream, or None: it must carry the run
    id this config would run under, so a summary of another config, benchmark or base is never reused."""
    from cram_ray.pipeline.driver import default_run_id

    rel = f"{run_rel(method, seed)}/summary.json"
    if not out.exists(rel):
        return None
    try:
        summary = out.read_json(rel)
    except ValueError:
        summary = None
    if not isinstance(summary, dict):
        print(f"[compare] {out.location(rel)}: not a summary (expected a JSON object); the stream runs or resumes",
              flush=True)
        return None
    return summary if summary.get("run_id") == default_run_id(cfg) else None


def stage_time(summary: dict[str, Any]) -> float:
    """Seconds recorded by the stream's five stages (a resumed stream's wall time counts only the
    part it reran, so the per-stage records are what compare across runs)."""
    secs = summary["stage_seconds"]
    return float(sum(secs.get(s, 0.0) for s in STAGES))


def _mean_std(values: list[Any]) -> Any:
    """``(mean, std)`` over seeds (sample std; None for one seed); None if no seed has a value."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    mean = statistics.fmean(vals)
    return (mean, statistics.stdev(vals) if len(vals) > 1 else None)


def method_rows(summaries: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """One table row per method: every column as (mean, std) over that method's seeds."""
    rows = []
    for method in methods:
        runs = [s for s in summaries if label_of(s) == method]
        row: dict[str, Any] = {"method": method, "seeds": len(runs)}
        for col, read in COLUMNS.items():
            row[col] = _mean_std([read(s) for s in runs])
        params = {s["params_added_total"] for s in runs}
        if len(params) == 1:  # the same architecture under every seed: an exact integer
            row["params added"] = params.pop()
        rows.append(row)
    return rows


def mean_matrix(runs: list[dict[str, Any]]) -> list[list[float]]:
    first = runs[0]["accuracy_matrix"]
    return [[statistics.fmean(r["accuracy_matrix"][t][i] for r in runs) for i in range(len(row))]
            for t, row in enumerate(first)]


def render_markdown(rows: list[dict[str, Any]], summaries: list[dict[str, Any]], methods: list[str],
                    seeds: list[int], cfg: StreamConfig, command: str) -> str:
    from cram_ray.report.tables import markdown_table, matrix_markdown

    first = summaries[0]
    env = first.get("environment") or {}
    pkgs = env.get("packages") or {}
    lines = [
        "# Methods compared", "",
        f"- benchmark: {first['benchmark']} ({len(first['tasks'])} tasks: {', '.join(first['tasks'])})",
        f"- budget: {cfg.train.steps_per_task} steps per task for every method, batch {cfg.train.batch_size}, "
        f"lr {cfg.train.lr}; seeds: {', '.join(map(str, seeds))}; executor: {cfg.train.executor}",
        f"- machine: {env.get('platform', '?')}, {env.get('cpu_count', '?')} CPUs, "
        f"GPU: {env.get('gpu') or 'none'}; python {env.get('python', '?')}, torch {pkgs.get('torch', '?')}, "
        f"transformers {pkgs.get('transformers', '?')}",
        f"- command: `{command}`", "",
        markdown_table(rows, ["method", "seeds", *COLUMNS]),
        "Scores in percent (docs/DESIGN.md §7): MFT = mean accuracy on each task right after learning it; MFN = mean "
        "final accuracy; MAA = mean accuracy along the stream; BWT = mean final minus just-learned accuracy "
        "(forgetting); routing acc. = share of test samples routed to their own task's expert (- = no "
        "routing decision); params added = parameters the deployed model gained over the stream; stage time "
        "= seconds recorded by the five stages. Mean ± sample std over seeds.", "",
        "## Accuracy matrices (mean over seeds; row = after training task, column = task)", "",
    ]
    for method in methods:
        runs = [s for s in summaries if label_of(s) == method]
        lines += [f"### {method}", "", matrix_markdown(mean_matrix(runs), runs[0]["tasks"])]
    return "\n".join(lines)


def plot_matrices(summaries: list[dict[str, Any]], methods: list[str], path: Path) -> Path:
    """The seed-mean accuracy matrices of the methods side by side, one shared colour scale."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cram_ray.eval.metrics import to_square

    fig = Figure(figsize=(2.6 * len(methods) + 0.8, 2.9), dpi=120)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    image = None
    for ax, method in zip(axes, methods):
        runs = [s for s in summaries if label_of(s) == method]
        a = to_square(mean_matrix(runs))
        image = ax.imshow(np.ma.masked_invalid(a), vmin=0.0, vmax=100.0, cmap="viridis")
        n = a.shape[0]
        if n <= 10:
            for (r, c), v in np.ndenumerate(a):
                if np.isfinite(v):
                    ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 50 else "black")
        names = [t if len(t) <= 10 else t[:9] + "\u2026" for t in runs[0]["tasks"]]
        ax.set_title(method, fontsize=9)
        ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(n), names if ax is axes[0] else [""] * n, fontsize=7)
    axes[0].set_ylabel("after training", fontsize=8)
    fig.colorbar(image, ax=list(axes), fraction=0.02, pad=0.02, label="accuracy (%)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def compare(args: argparse.Namespace, command: str) -> list[dict[str, Any]]:
    from cram_ray.pipeline.run import run_and_report

    methods = parse_methods(args.methods)
    seeds = parse_seeds(args.seeds)
    out = Storage(args.out)
    # every config is resolved (and checked) before the first stream starts
    base = resolve_config(argparse.Namespace(**{**vars(args), "method": method_of(methods[0]), "out": out.uri}))
    place = tracking_place(base, out)
    place.pull(out)
    extra: list[str] = []
    if base.tracking.enabled and not base.tracking.uri:
        extra = [f"tracking.uri={place.uri}"]  # one store: the streams' runs nest under the parent
    configs = {(m, s): run_config(args, m, s, extra) for m in methods for s in seeds}
    tracking_cfg = configs[(methods[0], seeds[0])]
    name = "compare-" + config_hash({"methods": methods, "seeds": seeds, "config": base.replace(
        **{"method.name": "-", "storage": "", "train.seed": 0}).to_dict()})[:10]
    from cram_ray.tracking.mlflow_tracker import ParentRun

    parent = ParentRun(tracking_cfg, place.local_dir, name, {"compare.methods": ",".join(methods),
                                                             "compare.seeds": ",".join(map(str, seeds)),
                                                             "config": base.to_dict()}, kind="compare",
                       artifact_location=place.artifact_location)
    summaries: list[dict[str, Any]] = []
    try:
        for method in methods:
            for seed in seeds:
                t0 = time.time()
                print(f"[compare] {method} seed {seed} -> {run_dir(out, method, seed)}", flush=True)
                summary = None if args.restart else finished_summary(out, method, seed, configs[(method, seed)])
                if summary is not None:
                    print(f"[compare] {method} seed {seed}: finished earlier (run {summary['run_id']}), "
                          "summary.json read", flush=True)
                else:
                    summary = run_and_report(configs[(method, seed)], out=run_dir(out, method, seed),
                                             restart=args.restart)
                summary["run_dir"] = str(run_dir(out, method, seed))
                summary["label"] = method
                parent.adopt(summary.get("mlflow_run_id"))
                summaries.append(summary)
                print(f"[compare] {method} seed {seed} done in {time.time() - t0:.1f}s", flush=True)
        report(summaries, methods, seeds, base, out, command, parent)
    except BaseException:
        parent.fail()
        raise
    finally:
        place.push(out)
    print(out.read_bytes("compare.md").decode().split("\n## ")[0], flush=True)
    print(f"[compare] compare.json/md, plots and every stream in {out.uri}; {place.describe()}", flush=True)
    return summaries


def report(summaries: list[dict[str, Any]], methods: list[str], seeds: list[int], cfg: StreamConfig,
           out: Union[str, Path, Storage], command: str, parent: ParentRun) -> list[str]:
    """compare.json, compare.md and the plots from the streams' summaries, written to ``out`` (a
    directory or URI) and logged to the parent run; returns their names."""
    from cram_ray.report.plots import grouped_bars

    out = out if isinstance(out, Storage) else Storage(str(out))
    rows = method_rows(summaries, methods)
    with tempfile.TemporaryDirectory(prefix="cram-compare-") as tmp:
        local = out.local_path("") or Path(tmp)  # plots and MLflow need local files; uploaded below
        local.mkdir(parents=True, exist_ok=True)
        files = [local / "compare.json", local / "compare.md"]
        files[0].write_text(json.dumps(summaries, indent=1))
        files[1].write_text(render_markdown(rows, summaries, methods, seeds, cfg, command))
        files.append(grouped_bars({r["method"]: {"MFN": r["MFN"], "BWT": r["BWT"]} for r in rows}, ["MFN", "BWT"],
                                  local / "compare_bars.png", title="Final accuracy (MFN) and forgetting (BWT)",
                                  ylabel="percent"))
        files.append(plot_matrices(summaries, methods, local / "accuracy_matrices.png"))
        for f in files:
            out.put_file(f, f.name)
        metrics = {r["method"]: {METRIC_KEYS[c]: (r[c][0] if isinstance(r[c], tuple) else r[c]) for c in COLUMNS}
                   for r in rows}
        parent.finish(metrics, files)
    return [f.name for f in files]


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run:  # one plan per method (their adapters differ); seeds repeat it
        seeds = parse_seeds(args.seeds)
        return max(dry_run(run_config(args, m, seeds[0], []), runs=len(seeds)) for m in parse_methods(args.methods))
    command = "python workflows/compare.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    compare(args, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
