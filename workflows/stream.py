"""Run (or resume) one continual stream and write ``<out>/summary.json``.

    python workflows/stream.py [--config YAML] [--benchmark MANIFEST] [--method NAME]
                               [--out DIR] [--run-id ID] [--executor local|ray] [--set key=value ...]

Works with no cluster (embedded local Ray, or ``--executor local`` for one process) and under
``ray job submit --working-dir . -- python workflows/stream.py ...``. Rerunning with the same
``--run-id`` and ``--out`` resumes at the first unfinished stage.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from cram_ray.cli import add_config_flags, fail_cleanly, resolve_config  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_flags(parser, out="runs/stream", out_help="output directory (summary.json, storage)")
    parser.add_argument("--method", help="continual-learning method (overrides method.name)")
    parser.add_argument("--run-id", help="run id; the same id and --out resume (default: from the config hash)")
    return parser


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    from cram_ray.pipeline.run import run_and_report

    summary = run_and_report(cfg, out=Path(args.out), run_id=args.run_id)
    print(json.dumps({k: summary[k] for k in ("mft", "mfn", "maa", "bwt", "routing_accuracy")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
