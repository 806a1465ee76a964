"""The tiny Llava and its processor: size, gradients, label masking, padding, greedy generation."""
import dataclasses
import io

import pytest
import torch
from PIL import Image

from cram_ray.data.records import Record
from cram_ray.models.vlm import IGNORE_INDEX, VLM, build_tiny_llava, compact_processor, num_patches


def png(colour, size=32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


RECORDS = [
    Record("a", "t", png((220, 30, 30)), "What colour is the shape?", "red", "exact"),
    Record("b", "t", png((30, 170, 50), size=48), "Which colour fills the whole picture here?", "green", "exact"),
    Record("c", "t", png((40, 70, 220)), "Colour?", "blue", "exact"),
    Record("d", "t", None, "What is written?", "top left", "exact"),
]


@pytest.fixture()
def vlm(tiny_cfg, tok):
    torch.manual_seed(0)
    return VLM(build_tiny_llava(tiny_cfg.model, tok), compact_processor(tiny_cfg.model, tiny_cfg.data, tok), tiny_cfg.model)


def test_default_model_has_a_few_million_parameters(tok):
    from cram_ray.config import ModelConfig

    model = build_tiny_llava(ModelConfig(), tok)
    n = sum(p.numel() for p in model.parameters())
    assert 2_000_000 < n < 10_000_000
    assert model.config.image_token_id == tok.image_token_id
    assert model.config.text_config.vocab_size == tok.vocab_size


def test_forward_backward_reaches_every_part(vlm):
    batch = vlm.processor.train_batch(RECORDS, [0, 0, 1, 1])
    out = vlm.loss(batch)
    assert out.logits.shape == (*batch["input_ids"].shape, vlm.processor.text.vocab_size)
    out.loss.backward()
    model = vlm.model.model
    for part in (model.vision_tower, model.multi_modal_projector, model.language_model):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)


def test_siglip_tower_builds_and_runs(tiny_cfg, tok):
    cfg = dataclasses.replace(tiny_cfg.model, vision_tower="siglip")
    proc = compact_processor(cfg, tiny_cfg.data, tok)
    model = build_tiny_llava(cfg, tok)
    out = model(**{k: v for k, v in proc.train_batch(RECORDS, [0] * 4).items() if k in ("input_ids", "attention_mask", "labels", "pixel_values")})
    assert torch.isfinite(out.loss)


def test_train_batch_masks_exactly_the_prompt(vlm):
    proc = vlm.processor
    batch = proc.train_batch(RECORDS, [0, 1, 2, 3])
    assert batch["task_index"].tolist() == [0, 1, 2, 3]
    assert batch["has_image"].tolist() == [True, True, True, False]
    assert batch["instruction"] == [r.instruction for r in RECORDS]
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    n_img = num_patches(vlm.cfg)
    for i, rec in enumerate(RECORDS):
        ids, mask, labels = batch["input_ids"][i], batch["attention_mask"][i], batch["labels"][i]
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # right padding
        assert (ids[length:] == proc.text.pad_id).all()
        assert ids[0] == proc.text.bos_id
        assert (ids[1:1 + n_img] == proc.text.image_token_id).all()
        answer_pos = (labels != IGNORE_INDEX).nonzero().flatten()
        first = int(answer_pos[0])
        assert answer_pos.tolist() == list(range(first, length))  # labels exactly on the target
        assert (labels[answer_pos] == ids[answer_pos]).all()
        assert proc.text.decode(ids[:first].tolist()).endswith("\nAnswer:")
        assert ids[length - 1] == proc.text.eos_id
        assert proc.text.decode(labels[answer_pos].tolist()) == " " + rec.answer


def test_text_is_truncated_to_the_budget(vlm):
    proc = vlm.processor
    long = Record("l", "t", None, "word " * 200, "a rather long answer " * 5, "exact")
    batch = proc.train_batch([long], [0])
    text_tokens = int(batch["attention_mask"].sum()) - 1 - proc.num_image_tokens
    assert text_tokens == proc.max_text_len
    prompt = proc.prompt_batch([long], [0])
    labels = batch["labels"][0]
    first = int((labels != IGNORE_INDEX).nonzero()[0])
    # the prompt of a training sample is the generation prompt, whatever the answer
    assert batch["input_ids"][0, :first].tolist() == prompt["input_ids"][0].tolist()


def test_blank_image_for_missing_images(vlm):
    px = vlm.processor.pixel_values([None, png((0, 0, 0), size=64)])
    assert px.shape == (2, 3, 32, 32)
    assert torch.equal(px[0], px[1])


def test_prompt_batch_is_left_padded(vlm):
    proc = vlm.processor
    batch = proc.prompt_batch(RECORDS, [0] * 4)
    assert "labels" not in batch
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask[:, -1].all()
    train = proc.train_batch(RECORDS, [0] * 4)
    for i in range(len(RECORDS)):
        length = int(mask[i].sum())
        assert not mask[i, : ids.shape[1] - length].any()
        assert (ids[i, : ids.shape[1] - length] == proc.text.pad_id).all()
        first = int((train["labels"][i] != IGNORE_INDEX).nonzero()[0])
        assert ids[i, -length:].tolist() == train["input_ids"][i, :first].tolist()
    assert len({int(m.sum()) for m in mask}) > 1  # the padding was exercised


def test_generation_returns_answers_of_an_overfit_model(vlm):
    torch.manual_seed(0)
    batch = vlm.processor.train_batch(RECORDS, [0] * 4)
    opt = torch.optim.AdamW(vlm.model.parameters(), lr=3e-3)
    vlm.model.train()
    for _ in range(60):
        loss = vlm.loss(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    answers = vlm.generate(vlm.processor.prompt_batch(RECORDS, [0] * 4), max_new_tokens=8)
    assert answers == [r.answer for r in RECORDS]
    # batched generation equals one-at-a-time generation (left padding is masked out)
    alone = [vlm.generate(vlm.processor.prompt_batch([r], [0]), max_new_tokens=8)[0] for r in RECORDS]
    assert alone == answers


def test_decode_answers_stops_at_eos(vlm):
    text = vlm.processor.text
    rows = [text.encode(" red") + [text.eos_id] + text.encode(" junk"), text.encode("  two words ") + [text.pad_id]]
    assert vlm.processor.decode_answers(rows) == ["red", "two words"]
