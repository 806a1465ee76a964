"""Stage 0: the base is trained once, published atomically, then served from the cache."""
import dataclasses

import pytest
import torch

import cram_ray.models.base as base_mod
from cram_ray.models.base import build_vlm, exact_match, get_base_vlm, pretrain, warmup_cosine
from cram_ray.models.tokenizer import CompactTokenizer
from cram_ray.models.vlm import VLM, answer_loss, build_tiny_llava, compact_processor, model_inputs
from models_testdata import scene_records, scene_vocabulary


def quiet(_msg: str) -> None:
    pass


@pytest.fixture()
def cfg(tiny_cfg, tmp_path):
    return tiny_cfg.replace(**{"data.cache_dir": str(tmp_path / "cache")})


def test_second_call_is_served_from_the_cache(cfg, tok):
    first = get_base_vlm(cfg, mix=scene_records, tok=tok, log=quiet)
    assert first.meta["source"] == "trained"
    assert first.meta["steps"] == cfg.model.base.steps and first.meta["heldout_exact"] is not None
    assert not any(p.requires_grad for p in first.model.parameters()) and not first.model.training
    calls = []

    def counting_mix(n, size, seed):
        calls.append(n)
        return scene_records(n, size, seed)

    counting_mix.__module__, counting_mix.__qualname__ = scene_records.__module__, scene_records.__qualname__
    second = get_base_vlm(cfg, mix=counting_mix, tok=tok, log=quiet)
    assert second.meta["source"] == "cache" and not calls
    assert second.meta["base_dir"] == first.meta["base_dir"]
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    root = base_mod.base_root(cfg)
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_the_key_follows_vocabulary_and_training_settings(cfg, tok):
    a = get_base_vlm(cfg, mix=scene_records, tok=tok, log=quiet)
    larger = CompactTokenizer.build([*scene_vocabulary(), "zebra crossing"])
    b = get_base_vlm(cfg, mix=scene_records, tok=larger, log=quiet)
    c = get_base_vlm(cfg.replace(**{"model.base.lr": 1e-3}), mix=scene_records, tok=tok, log=quiet)
    d = get_base_vlm(cfg.replace(**{"model.routing_image_layers": "last"}), mix=scene_records, tok=tok, log=quiet)
    e = get_base_vlm(cfg.replace(**{"model.dtype": "bfloat16"}), mix=scene_records, tok=tok, log=quiet)
    assert len({a.meta["base_dir"], b.meta["base_dir"], c.meta["base_dir"]}) == 3
    for same in (d, e):  # routing and serving precision do not retrain
        assert same.meta["base_dir"] == a.meta["base_dir"] and same.meta["source"] == "cache"
    assert next(e.model.parameters()).dtype == torch.bfloat16 and e.cfg.dtype == "bfloat16"
    assert b.processor.text.vocab_size > a.processor.text.vocab_size


def test_a_crash_leaves_no_half_written_base(cfg, tok):
    def broken_mix(n, size, seed):
        raise RuntimeError("mix failed")

    with pytest.raises(RuntimeError, match="mix failed"):
        get_base_vlm(cfg, mix=broken_mix, tok=tok, log=quiet)
    root = base_mod.base_root(cfg)
    assert not [p for p in root.iterdir() if p.is_dir()]


def test_pretraining_fits_a_small_set(cfg, tok):
    """A few dozen steps on 16 records must fit them (the recipe trains, not just runs)."""
    base = dataclasses.replace(cfg.model.base, steps=80, samples=16, lr=3e-3)
    torch.manual_seed(0)
    vlm = VLM(build_tiny_llava(cfg.model, tok), compact_processor(cfg.model, cfg.data, tok), cfg.model)
    records = scene_records(16, cfg.model.image_size, seed=0)
    logs = []
    losses = pretrain(vlm, records, base, log=logs.append)
    assert len(losses) == 80 and logs and not vlm.model.training
    assert sum(losses[-5:]) / 5 < 0.2 * sum(losses[:5]) / 5
    assert exact_match(vlm, records, max_new_tokens=4) >= 0.4  # chance is ~0.25


def test_answer_loss_equals_the_models_loss(cfg, tok):
    torch.manual_seed(0)
    vlm = VLM(build_tiny_llava(cfg.model, tok), compact_processor(cfg.model, cfg.data, tok), cfg.model)
    batch = vlm.processor.train_batch(scene_records(6, cfg.model.image_size, seed=2), [0] * 6)
    with torch.no_grad():
        assert torch.allclose(answer_loss(vlm.model, model_inputs(batch))[0], vlm.loss(batch).loss, atol=1e-5)


def test_warmup_then_cosine_schedule():
    total = 100
    factors = [warmup_cosine(s, total) for s in range(total)]
    peak = factors.index(max(factors))
    assert factors[0] < factors[peak] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[peak:], factors[peak + 1:]))
    assert factors[-1] < 0.01


def test_build_vlm_serves_the_frozen_tiny_base_with_the_shared_vocabulary(cfg):
    vlm = build_vlm(cfg)
    assert vlm.meta["source"] in ("trained", "cache")
    assert not any(p.requires_grad for p in vlm.model.parameters()) and not vlm.model.training
    assert vlm.cfg == cfg.model and vlm.processor.text == base_mod.base_tokenizer()


def test_build_vlm_loads_a_local_checkpoint(cfg, tmp_path):
    from test_vlm_io import make_hf_checkpoint

    make_hf_checkpoint(tmp_path / "ckpt")
    hf_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kind="hf_llava", path=str(tmp_path / "ckpt")))
    vlm = build_vlm(hf_cfg)
    assert not any(p.requires_grad for p in vlm.model.parameters()) and not vlm.model.training


def test_text_records_write_every_printable_token_and_repeat_their_instruction(tok):
    records = base_mod.text_records(tok, 3 * len(tok), seed=5)
    assert records == base_mod.text_records(tok, 3 * len(tok), seed=5)
    assert base_mod.text_records(tok, 10, seed=5) == records[:10]
    written = set()
    for r in records:
        assert r.image is None and r.task == base_mod.TEXT_TASK
        assert r.instruction == f"{base_mod.TEXT_PROMPT} {r.answer}" and r.answer.strip() == r.answer != ""
        written.update(tok.encode(" " + r.answer))
    printable = {i for i in range(len(tok)) if i not in tok.special_ids and tok.decode([i]).strip()
                 and tok.decode([i]).isprintable() and "\ufffd" not in tok.decode([i])}
    assert printable <= written
