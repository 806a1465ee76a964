"""Bad input to a stream: exit 2, exactly one line on stderr naming the key, flag, file or record,
and the earlier run in ``--out`` (and everything beside it) untouched."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Callable

import pytest
import yaml
from reliability_util import one_error_line, run_stream, tiny_builtin, tree_digest

from cram_ray.data.builtin import generate_builtin


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` over a few bytes of pixels: a bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def user_bench(tmp_path) -> Path:
    """The smoke stream's built-in benchmark written as a user's benchmark folder (outside ``--out``)."""
    return generate_builtin(tiny_builtin(), tmp_path / "bench")


def _records(manifest: Path, task: str, split: str) -> tuple[Path, list]:
    path = manifest.parent / "instructions" / task / f"{split}.json"
    return path, json.loads(path.read_text())


def _edit_records(manifest: Path, task: str, split: str, edit: Callable[[list], None]) -> None:
    path, records = _records(manifest, task, split)
    edit(records)
    path.write_text(json.dumps(records))


def _bomb(manifest: Path) -> None:
    (manifest.parent / "images/classify/test/00001.png").write_bytes(_png_header(20000, 20000))


def _deep_json(manifest: Path) -> None:
    (manifest.parent / "instructions/compose/test.json").write_text("[" * 100_000 + "]" * 100_000)


def _outside_root(manifest: Path) -> None:
    (manifest.parent.parent / "secret.png").write_bytes((manifest.parent / "images/count/test/00000.png").read_bytes())
    _edit_records(manifest, "count", "train", lambda r: r[2].update(image="../../secret.png"))


def _unknown_key(manifest: Path) -> None:
    doc = yaml.safe_load(manifest.read_text())
    doc["tasks"][1]["metrc"] = doc["tasks"][1].pop("metric")
    manifest.write_text(yaml.safe_dump(doc))


BENCHMARK_CASES = {
    # name: (edit of the user's benchmark, needles in the one line)
    "decompression-bomb image (20000x20000 header)": (_bomb, ["classify/test.json", "'classify-test-00001'",
                                                              "more pixels than PIL opens", "max_image_pixels"]),
    "JSON nested 100,000 deep": (_deep_json, ["compose/test.json", "nested 100000 deep"]),
    "image path escaping image_root": (_outside_root, ["count/train.json", "'count-train-00002'",
                                                       "outside image_root"]),
    "unknown task key": (_unknown_key, ["manifest.yaml", "tasks[1]", "'metrc'", "did you mean 'metric'"]),
    "duplicate record id": (lambda m: _edit_records(m, "count", "test", lambda r: r[3].update(id=r[0]["id"])),
                            ["count/test.json", "duplicate of record #0"]),
    "empty instruction": (lambda m: _edit_records(m, "compose", "train", lambda r: r[5]["conversations"][0].update(
        value="<image>\n  ")), ["compose/train.json", "'compose-train-00005'", "empty instruction"]),
}

CONFIG_CASES = {
    # name: (extra argv, needles)
    "model.vision_heads=0": (["--set", "model.vision_heads=0"], ["model.vision_heads", "expected >= 1"]),
    "train.eval_batch_size=0": (["--set", "train.eval_batch_size=0"], ["train.eval_batch_size", "expected >= 1"]),
    "train.lr=nan": (["--set", "train.lr=nan"], ["train.lr", "finite number > 0", "nan"]),
    "train.lr=-1": (["--set", "train.lr=-1"], ["train.lr", "finite number > 0", "-1"]),
    "target_modules naming no module": (["--set", "method.target_modules=[qq_proj]"],
                                        ["method.target_modules", "qq_proj", "expected some of"]),
    "unknown config key": (["--set", "train.lrr=1"], ["unknown config key 'train.lrr'"]),
    "config changed under the same run id": (["--set", "train.lr=0.5"],
                                             ["config changed since this run started: train.lr", "--restart"]),
    "--run-id ../x": (["--run-id", "../x"], ["--run-id '../x'", "expected"]),
    "--run-id absolute": (["--run-id", "/tmp/x"], ["--run-id '/tmp/x'"]),
    "--run-id ..": (["--run-id", ".."], ["--run-id '..'"]),
    "--run-id with a newline": (["--run-id", "a\nb"], ["--run-id 'a\\nb'"]),
    "--run-id datasets": (["--run-id", "datasets"], ["--run-id 'datasets'"]),
    "--benchmark missing": (["--benchmark", "/nonexistent/bench.yaml"], ["/nonexistent/bench.yaml", "not found"]),
}


def _check_refused(out: Path, cache_dir: str, extra: list[str], needles: list[str], capsys, **kw) -> None:
    runs = out.parent
    before = tree_digest(runs)
    capsys.readouterr()
    assert run_stream(out, cache_dir, *extra, **kw) == 2
    one_error_line(capsys.readouterr().err, *needles)
    assert tree_digest(runs) == before


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_or_flag(case, finished_run, cache_dir, capsys):
    extra, needles = CONFIG_CASES[case]
    _check_refused(finished_run, cache_dir, extra, needles, capsys)


@pytest.mark.parametrize("case", list(BENCHMARK_CASES))
def test_bad_benchmark(case, user_bench, finished_run, cache_dir, capsys):
    edit, needles = BENCHMARK_CASES[case]
    edit(user_bench)
    # the default run id: a new run of this benchmark beside the earlier one, which stays as it was
    _check_refused(finished_run, cache_dir, ["--benchmark", str(user_bench)], needles, capsys, run_id=None)


@pytest.mark.parametrize("where", ["out", "beneath"])
def test_out_pointing_at_a_file(where, tmp_path, cache_dir, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "results.txt").write_text("mine")
    out = runs / "results.txt" if where == "out" else runs / "results.txt" / "out"
    before = tree_digest(runs)
    assert run_stream(out, cache_dir) == 2
    one_error_line(capsys.readouterr().err, "storage", str(runs / "results.txt"), "is a file", "--out")
    assert tree_digest(runs) == before
