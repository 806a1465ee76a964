"""Run (or resume) a Ray Tune study of stream hyperparameters; each trial is a whole stream.

    python workflows/tune.py [--config YAML] [--benchmark MANIFEST] [--num-samples N] [--out DIR|URI]
                             [--executor local|ray] [--set key=value ...] [--dry-run]

Writes ``DIR/results.csv``, ``DIR/results.md``, ``DIR/pareto.png`` (objective vs parameters added,
Pareto front marked) and ``DIR/best.yaml`` (a preset ``workflows/stream.py --config`` accepts as
is). The search space, searcher, scheduler, objective and per-trial resources come from the
config's ``tune`` section (``--set tune.num_samples=8`` etc.). Rerunning with the same ``--out``
resumes the study: finished trials are kept, unfinished ones restart at their first unfinished
stage. ``--out`` may be an object-store URI (``s3://bucket/study``): Tune's experiment state, the
trials' streams and the reports all go there.
"""
from __future__ import annotations

import argparse
import shlex
import sys


from cram_ray.cli import add_config_flags, dry_run, fail_cleanly, resolve_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_flags(parser, out="runs/tune", out_help="study directory (results, trials, Tune state)",
                     executor_help="how each trial trains (overrides train.executor; ray = TorchTrainer runs per task)")
    parser.add_argument("--num-samples", type=int, help="trials to run (overrides tune.num_samples)")
    return parser


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_samples is not None:
        args.overrides = [*args.overrides, f"tune.num_samples={args.num_samples}"]
    # the study owns --out; each trial's stream gets its own storage under it
    cfg = resolve_config(argparse.Namespace(**{**vars(args), "out": None}))
    if args.dry_run:  # the base config's plan; trials vary it within tune.search_space
        return dry_run(cfg, runs=cfg.tune.num_samples)
    from cram_ray.tune.study import STATUS_COMPLETE, Study

    command = "python workflows/tune.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    study = Study(cfg, args.out, command=command)
    rows = study.run()
    out = study.out
    print(out.read_bytes("results.md").decode(), flush=True)
    complete = [r for r in rows if r["status"] == STATUS_COMPLETE]
    print(f"[tune] {len(rows)} trials, {len(complete)} complete; best preset: "
          + (out.location("best.yaml") if complete else "none (no trial completed)")
          + f"; study in {out.uri}; {study.place.describe()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
