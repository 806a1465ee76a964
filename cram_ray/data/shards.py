"""Parquet shards of records with the image bytes embedded (what Ray Data and the stages read).

One shard is ``part-XXXXX.parquet`` with the columns of :data:`~cram_ray.data.records.SCHEMA_FIELDS`
and :data:`~cram_ray.data.records.OPTIONAL_FIELDS` (older shards may lack the latter); a directory of shards is one split of one task. Rows keep the order they were written in.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cram_ray.data.records import OPTIONAL_FIELDS, SCHEMA_FIELDS, DataError, Record

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=True),
    pa.field("instruction", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("metric", pa.string(), nullable=False),
    pa.field("answers", pa.list_(pa.string()), nullable=True),
])
SHARD_GLOB = "part-*.parquet"


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def records_table(records: Sequence[Record]) -> pa.Table:
    """The records as one Arrow table with :data:`SCHEMA`."""
    rows = [r.to_row() for r in records]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_table(table: pa.Table, path: str, fs: pafs.FileSystem) -> None:
    """One shard at ``path`` of ``fs``, made visible whole (temporary name, then move)."""
    tmp = f"{path.rsplit('/', 1)[0]}/.{path.rsplit('/', 1)[1]}.tmp"
    pq.write_table(table, tmp, compression="zstd", filesystem=fs)
    fs.move(tmp, path)


def write_shards(records: Sequence[Record], out_dir: str | os.PathLike, rows_per_shard: int = 512) -> list[Path]:
    """Write ``records`` as ``out_dir/part-00000.parquet``, ... of at most ``rows_per_shard`` rows.

    A folder of shards is written once: one that already holds shards is refused, never emptied.
    Zero records still give one empty shard, so the directory always carries the schema.
    """
    if rows_per_shard < 1:
        raise ValueError(f"write_shards: rows_per_shard must be >= 1, got {rows_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob(SHARD_GLOB)):
        raise DataError(f"{out}: already holds shards (expected an empty folder; shards are written once)")
    fs = pafs.LocalFileSystem()
    paths = []
    for k, start in enumerate(range(0, max(len(records), 1), rows_per_shard)):
        path = out / shard_name(k)
        write_table(records_table(records[start:start + rows_per_shard]), str(path), fs)
        paths.append(path)
    return paths


def read_shards(directory: str | os.PathLike) -> list[Record]:
    """Every record of the shards in ``directory``, in shard then row order."""
    d = Path(directory)
    paths = sorted(d.glob(SHARD_GLOB))
    if not paths:
        raise DataError(f"{d}: no shards (expected {SHARD_GLOB} files written by write_shards)")
    out: list[Record] = []
    for path in paths:
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: not a readable parquet shard ({err})") from None
        missing = [c for c in SCHEMA_FIELDS if c not in table.column_names]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)} (expected {', '.join(SCHEMA_FIELDS)})")
        columns = list(SCHEMA_FIELDS) + [c for c in OPTIONAL_FIELDS if c in table.column_names]
        out.extend(Record.from_row(row) for row in table.select(columns).to_pylist())
    return out
