"""Parquet shards: records round-trip exactly, split by rows_per_shard, rewrites leave no stale parts."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from data_testutil import jpeg, png

from cram_ray.data.records import OPTIONAL_FIELDS, SCHEMA_FIELDS, DataError, Record
from cram_ray.data.shards import SCHEMA, read_shards, write_shards


def _records(n: int) -> list[Record]:
    out = []
    for i in range(n):
        image = None if i % 4 == 3 else (png((5 + i % 3, 7), (i, 2 * i % 256, 90)) if i % 2 else jpeg())
        out.append(Record(id=f"r{i}", task="t\u00e9che", image=image, instruction=f"Question {i}? \u2192 \u00e9\n",
                          answer=f"[{i}, 0, 1, 2]" if i % 5 else "", metric="iou",
                          answers=(f"a{i}", "b") if i % 3 == 1 else None))
    return out


def test_schema_is_the_record_schema():
    assert tuple(SCHEMA.names) == SCHEMA_FIELDS + OPTIONAL_FIELDS
    assert SCHEMA.field("image").nullable and SCHEMA.field("answers").nullable


def test_shards_without_the_optional_columns_still_read(tmp_path):
    recs = [r for r in _records(6) if r.answers is None]
    write_shards(recs, tmp_path / "s")
    path = tmp_path / "s" / "part-00000.parquet"
    pq.write_table(pq.read_table(path).drop_columns(list(OPTIONAL_FIELDS)), path)
    assert read_shards(tmp_path / "s") == recs


@pytest.mark.parametrize("n,rows,shards", [(1, 512, 1), (10, 3, 4), (12, 4, 3), (7, 100, 1)])
def test_round_trip_is_exact(tmp_path, n, rows, shards):
    recs = _records(n)
    paths = write_shards(recs, tmp_path / "s", rows_per_shard=rows)
    assert [p.name for p in paths] == [f"part-{k:05d}.parquet" for k in range(shards)]
    assert all(pq.read_metadata(p).num_rows <= rows for p in paths)
    assert read_shards(tmp_path / "s") == recs


def test_a_folder_of_shards_is_written_once(tmp_path):
    write_shards(_records(10), tmp_path, rows_per_shard=2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(DataError, match="already holds shards"):
        write_shards(_records(3), tmp_path, rows_per_shard=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_no_records_still_writes_the_schema(tmp_path):
    paths = write_shards([], tmp_path)
    assert len(paths) == 1 and pq.read_schema(paths[0]).names == list(SCHEMA_FIELDS + OPTIONAL_FIELDS)
    assert read_shards(tmp_path) == []


def test_reading_a_folder_without_shards_names_it(tmp_path):
    with pytest.raises(DataError, match="no shards"):
        read_shards(tmp_path)
