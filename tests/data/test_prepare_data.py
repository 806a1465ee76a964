"""workflows/prepare_data.py as a user runs it: a prepared dataset, or one error line, exit 2 and
nothing written; every containment rule and limit has a case here."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from data_testutil import turn
from PIL import Image

from cram_ray.data.manifest import load_benchmark
from cram_ray.data.shards import read_shards

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("prepare_data_script", ROOT / "workflows" / "prepare_data.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file and symlink under ``folder`` with its content hash (what "untouched" means)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes() if p.is_file() else b"").hexdigest()
            for p in sorted(folder.rglob("*")) if not p.is_symlink()}


def _prepare(bench_or_manifest, out: Path, tmp_path: Path, *extra: str) -> int:
    manifest = bench_or_manifest if isinstance(bench_or_manifest, Path) else bench_or_manifest.write()
    return script.main([str(manifest), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *extra])


def test_writes_shards_with_the_images_own_bytes(bench, tmp_path, capsys):
    out = tmp_path / "out"
    assert _prepare(bench, out, tmp_path, "--rows-per-shard", "2") == 0
    marker = json.loads((out / "_DONE.json").read_text())
    assert marker["benchmark"] == "toy" and len(marker["hash"]) == 64
    assert marker["tasks"] == [
        {"name": "colour", "metric": "lower_exact", "train": 3, "test": 1},
        {"name": "letter", "metric": "option_letter", "train": 1, "test": 1},
    ]
    assert sorted(p.name for p in (out / "colour" / "train").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    bench_data = load_benchmark(bench.manifest_path)
    for task in bench_data.tasks:
        for split in ("train", "test"):
            assert read_shards(out / task.name / split) == task.records(split)
    jpeg_row = read_shards(out / "colour" / "train")[1]
    assert jpeg_row.image == bench.images["b.jpg"]  # not re-encoded
    # the same benchmark again: found, nothing written
    before = tree_digest(out)
    capsys.readouterr()
    assert _prepare(bench, out, tmp_path) == 0
    assert f"shards {marker['hash'][:16]} found, nothing to prepare" in capsys.readouterr().out
    assert tree_digest(out) == before


def test_an_output_folder_with_other_data_is_refused_untouched(bench, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "colour" / "train").mkdir(parents=True)
    (out / "colour" / "train" / "part-00000.parquet").write_bytes(b"mine")
    before = tree_digest(tmp_path)
    assert _prepare(bench, out, tmp_path) == 2
    assert "not a prepared dataset" in capsys.readouterr().err
    assert {k: v for k, v in tree_digest(tmp_path).items() if not k.startswith(("cache", "bench"))} == \
        {k: v for k, v in before.items() if not k.startswith(("cache", "bench"))}


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data): what a bomb's header says."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _outside_image(bench):
    (bench.root.parent / "secret.png").parent.mkdir(parents=True, exist_ok=True)
    (bench.root.parent / "secret.png").write_bytes(bench.images["a.png"])
    bench.json["json/colour_train.json"][0]["image"] = "../../secret.png"


def _absolute_image(bench):
    _outside_image(bench)
    bench.json["json/colour_train.json"][0]["image"] = str(bench.root.parent / "secret.png")


def _symlinked_image(bench):
    _outside_image(bench)
    bench.write()
    (bench.root / "imgs" / "link.png").symlink_to(bench.root.parent / "secret.png")
    bench.json["json/colour_train.json"][0]["image"] = "link.png"


def _outside_json(bench):
    bench.write()
    (bench.root.parent / "stolen.json").write_text(json.dumps(bench.json["json/colour_test.json"]))
    bench.manifest["tasks"][0]["test"] = "../stolen.json"


def _deep_json(bench):
    bench.raw_json["json/letter_test.json"] = "[" * 100_000 + "]" * 100_000


def _huge_pixels(bench):
    bench.images["c.png"] = _png_header(20000, 20000)


def _control_chars(bench):
    bench.json["json/colour_train.json"][1]["image"] = "gone\n\x1b[31m.png"


CASES = {
    # name: (edit, needles in the one error line)
    "image ../ outside image_root": (_outside_image, ["colour_train.json", "'c1'", "'image'", "outside image_root"]),
    "absolute image path": (_absolute_image, ["colour_train.json", "'c1'", "outside image_root"]),
    "symlink out of image_root": (_symlinked_image, ["colour_train.json", "'c1'", "link.png", "outside image_root"]),
    "task JSON outside the manifest folder": (_outside_json, ["bench.yaml", "'colour'", "'test'", "outside the manifest"]),
    "task named ..": (lambda b: b.manifest["tasks"][1].update(name=".."), ["bench.yaml", "tasks[1]", "'name'", "'..'"]),
    "task name with a slash": (lambda b: b.manifest["tasks"][0].update(name="a/b"), ["tasks[0]", "'a/b'"]),
    "unknown manifest key": (lambda b: b.manifest.update(imgae_root=b.manifest.pop("image_root")),
                             ["bench.yaml", "unknown key 'imgae_root'", "did you mean 'image_root'"]),
    "unknown task key": (lambda b: b.manifest["tasks"][0].update(metrc="exact"),
                         ["bench.yaml", "tasks[0]", "'metrc'", "did you mean 'metric'"]),
    "unknown limit": (lambda b: b.manifest.update(limits={"max_pixels": 5}), ["'max_pixels'", "max_image_pixels"]),
    "duplicate record id": (lambda b: b.json["json/colour_train.json"][1].update(id="c1"),
                            ["colour_train.json", "'c1' (#1)", "duplicate of record #0"]),
    "empty instruction": (lambda b: b.json["json/colour_train.json"][0].update(conversations=turn("  ", "red")),
                          ["colour_train.json", "'c1'", "empty instruction"]),
    "JSON nested 100,000 deep": (_deep_json, ["letter_test.json", "nested 100000 deep", "max_json_depth=64"]),
    "JSON over its byte limit": (lambda b: b.manifest.update(limits={"max_json_bytes": 100}),
                                 ["colour_train.json", "max_json_bytes=100"]),
    "decompression bomb header": (_huge_pixels, ["colour_test.json", "'c4'", "c.png", "max_image_pixels"]),
    "image over the pixel limit": (lambda b: b.manifest.update(limits={"max_image_pixels": 100}),
                                   ["colour_train.json", "'c1'", "12x10", "max_image_pixels=100"]),
    "image over the byte limit": (lambda b: b.manifest.update(limits={"max_image_bytes": 50}),
                                  ["colour_train.json", "'c1'", "max_image_bytes=50"]),
    "control characters in a path": (_control_chars, ["colour_train.json", "'c2'", "gone\\n\\x1b[31m.png", "not found"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(bench, tmp_path, capsys, case):
    edit, needles = CASES[case]
    edit(bench)
    manifest = bench.write()
    out = tmp_path / "out"
    before = tree_digest(tmp_path)
    assert _prepare(manifest, out, tmp_path) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "\x1b" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    after = tree_digest(tmp_path)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
    assert {k: v for k, v in after.items() if not k.startswith("cache")} == \
        {k: v for k, v in before.items() if not k.startswith("cache")}


def test_allow_outside_root_admits_what_containment_refuses(bench, tmp_path):
    _symlinked_image(bench)
    bench.manifest["allow_outside_root"] = True
    out = tmp_path / "out"
    assert _prepare(bench, out, tmp_path) == 0
    assert read_shards(out / "colour" / "train")[0].image == bench.images["a.png"]


def test_an_image_inside_its_root_through_a_symlink_is_accepted(bench, tmp_path):
    bench.write()
    (bench.root / "imgs" / "alias.png").symlink_to(bench.root / "imgs" / "a.png")
    bench.json["json/colour_train.json"][0]["image"] = "alias.png"
    out = tmp_path / "out"
    assert _prepare(bench, out, tmp_path) == 0


def test_a_12000_square_image_is_refused_before_decoding(bench, tmp_path, capsys):
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")
    bench.images["c.png"] = buf.getvalue()
    assert _prepare(bench, tmp_path / "out", tmp_path) == 2
    assert "12000x12000 (limit max_image_pixels=40000000)" in capsys.readouterr().err


def test_missing_manifest_exits_2(tmp_path, capsys):
    assert _prepare(tmp_path / "none.yaml", tmp_path / "out", tmp_path) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "none.yaml" in err
