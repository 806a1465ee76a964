"""The bases shipped with the package: they verify, they serve their presets without pretraining,
a tampered file is refused in one line, and they share one vocabulary that encodes any text."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cram_ray.models.base as base_mod
from cram_ray.config import load_config
from cram_ray.data.builtin import vocabulary_texts
from cram_ray.data.pretrain_mix import pretrain_records, pretrain_vocabulary_texts
from cram_ray.data.records import DataError
from cram_ray.models.tokenizer import gpt2_tokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "workflows" / "configs"
SHIPPED = ("smoke", "tiny-cpu")
SIZE_BUDGET = 16e6  # bytes of every shipped file together


def preset(name: str, tmp_path: Path):
    return load_config(str(CONFIGS / f"{name}.yaml"), [f"data.cache_dir={tmp_path}"])


def test_each_preset_is_served_by_its_verified_shipped_base():
    shipped = base_mod.shipped_bases()
    tok = base_mod.base_tokenizer()
    for name in SHIPPED:
        key = base_mod.base_key(preset(name, Path("/unused")), tok, base_mod.mix_name(pretrain_records))
        assert shipped.get(key) == base_mod.ASSETS / name, f"{name}: no shipped base for the preset's current fields"
        meta = base_mod.verify_shipped(shipped[key])
        assert meta["vocabulary"] == json.loads(tok.to_json())
        assert meta["base_version"] == base_mod.BASE_VERSION and meta["dtype"] == "float16"
    files = [f for f in base_mod.ASSETS.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < SIZE_BUDGET


def test_the_shipped_smoke_base_loads_without_pretraining(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the shipped base was not used")

    monkeypatch.setattr(base_mod, "train_base", no_training)
    cfg = preset("smoke", tmp_path)
    vlm = base_mod.build_vlm(cfg)
    assert vlm.meta["source"] == "shipped" and vlm.meta["base_dir"] == str(base_mod.ASSETS / "smoke")
    assert not any(p.requires_grad for p in vlm.model.parameters()) and not vlm.model.training
    weights = load_file(str(base_mod.ASSETS / "smoke" / base_mod.WEIGHTS_FILE))
    state = vlm.model.state_dict()
    assert set(weights) == set(state)
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], w.float()) for k, w in weights.items())
    assert not (tmp_path / "base").exists()  # nothing was written to the cache


def test_a_tampered_shipped_base_is_refused_in_one_line(tmp_path):
    copy = tmp_path / "smoke"
    shutil.copytree(base_mod.ASSETS / "smoke", copy)
    weights = copy / base_mod.WEIGHTS_FILE
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        base_mod.load_shipped(copy, preset("smoke", tmp_path))
    message = str(err.value)
    assert "\n" not in message and str(weights) in message and "SHA-256" in message


def test_the_shared_vocabulary_holds_the_mix_and_encodes_any_benchmark_text():
    tok = base_mod.base_tokenizer()
    assert tok.vocab_size == base_mod.VOCABULARY_SIZE
    gpt2 = gpt2_tokenizer()
    for text in [base_mod.TEXT_PROMPT, *pretrain_vocabulary_texts()]:  # one compact id per GPT-2 token
        assert len(tok.encode(text)) == len(gpt2.encode(text).ids), text
    for text in [*vocabulary_texts(), "Which planet has the most moons? Saturn (146)", "naïve café 日本語"]:
        assert tok.decode(tok.encode(text)) == text


def test_rare_text_records_spell_words_outside_the_vocabulary():
    tok = base_mod.base_tokenizer()
    records = base_mod.text_records(tok, 4 * base_mod.RARE_EVERY, seed=0)
    rare = records[base_mod.RARE_EVERY - 1::base_mod.RARE_EVERY]
    gpt2 = gpt2_tokenizer()
    for r in rare:
        assert r.answer.isalpha() and r.instruction == f"{base_mod.TEXT_PROMPT} {r.answer}"
        spaced = " " + r.answer  # how the answer follows the prompt
        assert gpt2.encode(spaced).tokens[0] not in set(tok.tokens)
        assert len(tok.encode(spaced)) > len(gpt2.encode(spaced).ids) and tok.decode(tok.encode(spaced)) == spaced
