"""Turn a benchmark manifest into a prepared dataset: parquet shards with the images' own bytes.

    python workflows/prepare_data.py MANIFEST --out DIR [--rows-per-shard N] [--executor local|ray]
                                     [--cache-dir DIR]

Writes ``DIR/<task>/<split>/part-*.parquet`` for every task and split,
``DIR/files.json`` (every benchmark file's SHA-256) and last ``DIR/_DONE.json`` (benchmark name,
content hash, task order, metric and record counts per task): the same code and layout as a
stream's ``<storage>/datasets/<hash>``. ``DIR`` must not exist, or hold the same benchmark
already (then nothing is prepared); it appears only once complete. ``--executor ray`` reads the
images in a Ray Data job; ``local`` (default) streams them through this process one shard at a
time. Bad data ends the program with one line on stderr naming the file, record and field, exit 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from cram_ray.cli import fail_cleanly
from cram_ray.data.identity import identify
from cram_ray.data.manifest import load_benchmark
from cram_ray.data.prepare import ROWS_PER_SHARD, prepare
from cram_ray.pipeline.ledger import Storage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", help="benchmark manifest YAML")
    parser.add_argument("--out", required=True, help="output directory (created; must not hold other data)")
    parser.add_argument("--rows-per-shard", type=int, default=ROWS_PER_SHARD,
                        help=f"rows per parquet shard (default {ROWS_PER_SHARD})")
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help="local: this process, one shard at a time; ray: a Ray Data job")
    parser.add_argument("--cache-dir", default="~/.cache/cram_ray",
                        help="where the per-benchmark file index lives (makes re-hashing fast)")
    return parser


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rows_per_shard < 1:
        print(f"error: --rows-per-shard: expected >= 1, got {args.rows_per_shard}", file=sys.stderr)
        return 2
    bench = load_benchmark(args.manifest, check_images=False)
    identity = identify(bench, Path(args.cache_dir).expanduser() / "content")
    if args.executor == "ray":
        from cram_ray.config import TrainConfig
        from cram_ray.pipeline.ray_cluster import connect

        connect(TrainConfig())
    out = Path(args.out).expanduser().resolve()
    marker = prepare(bench, identity, Storage(str(out.parent)), out.name,
                     use_ray=args.executor == "ray", rows_per_shard=args.rows_per_shard)
    for t in marker["tasks"]:
        print(f"{t['name']}: {t['train']} train, {t['test']} test records")
    print(f"wrote {out} (benchmark hash {identity.hash})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
