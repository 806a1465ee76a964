"""Turn a benchmark manifest into a prepared dataset: parquet shards with the images' own bytes.

    python workflows/prepare_data.py MANIFEST --out DIR [--rows-per-shard N] [--executor local|ray]
                                     [--cache-dir DIR]
    python workflows/prepare_data.py --from coin|ucit SRC --out DIR [--convert-only]
                                     [--instructions REL] [--images REL] [--skip-missing-images] [...]

Writes ``DIR/<task>/<split>/part-*.parquet`` for every task and split,
``DIR/files.json`` (every benchmark file's SHA-256) and last ``DIR/_DONE.json`` (benchmark name,
content hash, task order, metric and record counts per task): the same code and layout as a
stream's ``<storage>/datasets/<hash>``. ``DIR`` must not exist, or hold the same benchmark
already (then nothing is prepared); it appears only once complete. ``--executor ray`` reads the
images in a Ray Data job; ``local`` (default) streams them through this process one shard at a
time. Bad data ends the program with one line on stderr naming the file, record and field, exit 2.

``--from coin|ucit SRC`` starts from a released CoIN or UCIT download instead of a manifest: it
converts SRC into the benchmark folder ``DIR/benchmark`` (manifest ``DIR/benchmark/<layout>.yaml``,
the one ``workflows/stream.py --benchmark`` takes) and prepares its shards into ``DIR/shards``;
``--convert-only`` stops after the conversion (see cram_ray/data/convert.py, docs/data.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from cram_ray.cli import fail_cleanly
from cram_ray.data.convert import LAYOUTS, convert
from cram_ray.data.identity import identify
from cram_ray.data.manifest import load_benchmark
from cram_ray.data.prepare import ROWS_PER_SHARD, prepare
from cram_ray.pipeline.ledger import Storage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", nargs="?", help="benchmark manifest YAML (or --from)")
    parser.add_argument("--out", required=True, help="output directory (created; must not hold other data)")
    parser.add_argument("--from", dest="source", nargs=2, metavar=("LAYOUT", "SRC"),
                        help=f"convert a released benchmark first: LAYOUT one of {', '.join(LAYOUTS)}, SRC its "
                             "download folder; writes DIR/benchmark (manifest + JSON) and DIR/shards")
    parser.add_argument("--convert-only", action="store_true", help="with --from: write DIR/benchmark only")
    parser.add_argument("--instructions", help="with --from: the instruction folder, relative to SRC")
    parser.add_argument("--images", help="with --from: the image folder, relative to SRC")
    parser.add_argument("--skip-missing-images", action="store_true",
                        help="with --from: drop (and count) records whose image is not on disk")
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
    out = Path(args.out).expanduser().resolve()
    if (args.manifest is None) == (args.source is None):
        print("error: give a MANIFEST or --from LAYOUT SRC (exactly one)", file=sys.stderr)
        return 2
    if args.source is None and (args.convert_only or args.instructions or args.images or args.skip_missing_images):
        print("error: --convert-only, --instructions, --images and --skip-missing-images go with --from",
              file=sys.stderr)
        return 2
    manifest = args.manifest
    if args.source is not None:
        conv = convert(*args.source, out / "benchmark", instructions=args.instructions, images=args.images,
                       skip_missing_images=args.skip_missing_images)
        for t in conv.tasks:
            print(f"{t.name}: {t.train} train, {t.test} test records, metric {t.metric} "
                  f"({t.skipped} skipped, {t.renamed} repeated ids renamed, {t.with_references} with reference lists)")
        print(f"{'found' if conv.reused else 'wrote'} {conv.manifest}")
        if args.convert_only:
            return 0
        manifest, out = conv.manifest, out / "shards"
    bench = load_benchmark(manifest, check_images=False)
    identity = identify(bench, Path(args.cache_dir).expanduser() / "content")
    if args.executor == "ray":
        from cram_ray.config import TrainConfig
        from cram_ray.pipeline.ray_cluster import connect

        connect(TrainConfig())
    marker = prepare(bench, identity, Storage(str(out.parent)), out.name,
                     use_ray=args.executor == "ray", rows_per_shard=args.rows_per_shard)
    for t in marker["tasks"]:
        print(f"{t['name']}: {t['train']} train, {t['test']} test records")
    print(f"wrote {out} (benchmark hash {identity.hash})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
