"""Helpers of the data tests: image bytes and a small hand-written benchmark in the manifest + LLaVA-JSON layout."""
from __future__ import annotations

import io
import json
from pathlib import Path

import yaml
from PIL import Image


def png(size=(12, 10), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(size=(16, 8), colour=(20, 90, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def turn(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


class BenchWriter:
    """Writes a two-task benchmark under ``root``; tests edit its parts before :meth:`write`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.images = {"a.png": png(), "b.jpg": jpeg(), "c.png": png((9, 9), (0, 200, 0))}
        self.manifest = {
            "name": "toy",
            "image_root": "imgs/",
            "tasks": [
                {"name": "colour", "train": "json/colour_train.json", "test": "json/colour_test.json",
                 "metric": "lower_exact"},
                {"name": "letter", "train": "json/letter_train.json", "test": "json/letter_test.json",
                 "metric": "option_letter"},
            ],
        }
        self.json = {
            "json/colour_train.json": [
                {"id": "c1", "image": "a.png", "conversations": turn("What colour?", "red")},
                {"id": "c2", "image": "b.jpg", "conversations": turn("What colour?", "blue")},
                {"id": "c3", "conversations": [{"from": "human", "value": "Say green."},
                                               {"from": "gpt", "value": "green"}]},
            ],
            "json/colour_test.json": [{"id": "c4", "image": "c.png", "conversations": turn("What colour?", "green")}],
            "json/letter_train.json": [
                {"id": 7, "image": "a.png", "conversations": turn("Pick one. (A) red (B) blue", "A")},
            ],
            "json/letter_test.json": [
                {"id": "l2", "image": "b.jpg", "conversations": turn("Pick one. (A) red (B) blue", "B")},
            ],
        }
        self.raw_json: dict[str, str] = {}  # file -> literal text, overrides self.json

    @property
    def manifest_path(self) -> Path:
        return self.root / "bench.yaml"

    def write(self) -> Path:
        (self.root / "imgs").mkdir(parents=True, exist_ok=True)
        for name, data in self.images.items():
            (self.root / "imgs" / name).write_bytes(data)
        for rel, rows in self.json.items():
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.raw_json.get(rel, json.dumps(rows, indent=1)))
        self.manifest_path.write_text(yaml.safe_dump(self.manifest, sort_keys=False))
        return self.manifest_path
