"""Run (or resume) one continual stream and write ``<out>/summary.json``.

    python workflows/stream.py [--config YAML] [--benchmark MANIFEST] [--method NAME]
                               [--out DIR|URI] [--run-id ID] [--restart] [--executor local|ray]
                               [--set key=value ...] [--dry-run]

Works with no cluster (embedded local Ray, or ``--executor local`` for one process) and under
``ray job submit --working-dir . -- python workflows/stream.py ...``. Rerunning with the same
``--run-id`` and ``--out`` resumes at the first unfinished stage; ``--restart`` reruns it from the
data stage (needed when its benchmark or config changed). ``--out`` is a local directory or an
object-store URI (``s3://bucket/run``, ``gs://...``); everything the run writes goes there.
"""
from __future__ import annotations

import argparse
import json
import sys


from cram_ray.cli import add_config_flags, add_restart_flag, dry_run, fail_cleanly, resolve_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_flags(parser, out="runs/stream", out_help="output directory (summary.json, storage)")
    parser.add_argument("--method", help="continual-learning method (overrides method.name)")
    parser.add_argument("--run-id", help="run id; the same id and --out resume (default: from the config hash)")
    return add_restart_flag(parser)


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    if args.dry_run:
        return dry_run(cfg)
    from cram_ray.pipeline.run import run_and_report, where_line

    summary = run_and_report(cfg, out=args.out, run_id=args.run_id, restart=args.restart)
    print(json.dumps({k: summary[k] for k in ("mft", "mfn", "maa", "bwt", "routing_accuracy")}))
    print(where_line(cfg, args.out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
