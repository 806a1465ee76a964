"""The Ray Data preparation writes what the in-process one writes, in order; a bad image still
fails with one line naming file and record."""
from __future__ import annotations

import pytest

from cram_ray.data.identity import identify
from cram_ray.data.manifest import load_benchmark
from cram_ray.data.prepare import prepare
from cram_ray.data.records import DataError
from cram_ray.data.shards import read_shards
from cram_ray.pipeline.ledger import Storage

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from cram_ray.pipeline.ray_cluster import quiet_data

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    quiet_data()
    yield
    ray.shutdown()


def test_ray_data_and_local_write_the_same_records_in_order(bench, tmp_path, ray_local):
    rows = bench.json["json/colour_train.json"]
    names = list(bench.images)
    for i in range(3, 23):
        rows.append({"id": f"x{i}", "image": names[i % 3], "conversations": rows[i % 2]["conversations"]})
    bench_data = load_benchmark(bench.write())
    ident = identify(bench_data, None)
    storage = Storage(str(tmp_path))
    for use_ray in (False, True):
        prepare(bench_data, ident, storage, f"ray-{use_ray}", use_ray=use_ray, rows_per_shard=4)
    for task in bench_data.tasks:
        for split in ("train", "test"):
            local = read_shards(tmp_path / "ray-False" / task.name / split)
            assert local == task.records(split)
            assert read_shards(tmp_path / "ray-True" / task.name / split) == local
    assert len(list((tmp_path / "ray-True" / "colour" / "train").glob("part-*.parquet"))) == 6


def test_a_bad_image_in_a_ray_worker_is_one_line(bench, tmp_path, ray_local):
    bench.images["b.jpg"] = b"\xff\xd8 not a jpeg"
    bench_data = load_benchmark(bench.write(), check_images=False)
    with pytest.raises(DataError) as info:
        prepare(bench_data, identify(bench_data, None), Storage(str(tmp_path)), "out", use_ray=True)
    msg = str(info.value)
    assert "\n" not in msg and "colour_train.json: record 'c2' (#1) field 'image': cannot decode" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]
