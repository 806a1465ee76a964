"""Turn a benchmark manifest into parquet shards with embedded images, plus an index.

    python workflows/prepare_data.py MANIFEST --out DIR [--rows-per-shard N]

Writes ``DIR/<task>/<split>/part-XXXXX.parquet`` for every task and split and ``DIR/index.json``
(benchmark name, task order, metric and record counts per task). Bad data ends the program with
one line on stderr naming the file, record and field, and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from cram_ray.cli import fail_cleanly  # noqa: E402
from cram_ray.data.manifest import SPLITS, load_benchmark  # noqa: E402
from cram_ray.data.shards import write_shards  # noqa: E402

INDEX_FILE = "index.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", help="benchmark manifest YAML")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--rows-per-shard", type=int, default=512, help="rows per parquet shard (default 512)")
    return parser


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rows_per_shard < 1:
        print(f"error: --rows-per-shard: expected >= 1, got {args.rows_per_shard}", file=sys.stderr)
        return 2
    bench = load_benchmark(args.manifest)
    out = Path(args.out)
    tasks = []
    for task in bench.tasks:
        counts = {}
        for split in SPLITS:
            records = task.records(split)
            shards = write_shards(records, out / task.name / split, rows_per_shard=args.rows_per_shard)
            counts[split] = len(records)
            print(f"{task.name}/{split}: {len(records)} records in {len(shards)} shard(s)")
        tasks.append({"name": task.name, "metric": task.metric, **counts})
    index = {"benchmark": bench.name, "manifest": str(bench.path), "tasks": tasks}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    print(f"wrote {out / INDEX_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
