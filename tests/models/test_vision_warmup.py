"""Stage 0a: the convolutional stem and the vision warm-up that teaches the tower before the LM."""
import io

import numpy as np
import torch
from PIL import Image, ImageDraw

from cram_ray.data.records import Record
from cram_ray.models.vision_warmup import CAPTION_WORDS, QuestionHead, allowed_answers, short_qa, warm_up_vision
from cram_ray.models.vlm import VLM, ConvStem, build_tiny_llava, compact_processor


def shape_png(shape: str, size: int = 32, shift: int = 0) -> bytes:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    box = (6 + shift, 6, 24 + shift, 24)
    if shape == "circle":
        d.ellipse(box, fill=(0, 0, 0))
    else:
        d.rectangle(box, fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_conv_stem_keeps_the_patch_grid_and_the_dtype_hook():
    stem = ConvStem(hidden=48, patch=8)
    out = stem(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 48, 4, 4)  # one token per 8x8 patch, like the patchify conv
    assert stem.weight is stem.out.weight
    assert len(stem.stages) == 3


def test_tiny_llava_uses_the_stem_and_runs(tiny_cfg, tok):
    model = build_tiny_llava(tiny_cfg.model, tok)
    assert any(isinstance(m, ConvStem) for m in model.modules())
    plain = build_tiny_llava(tiny_cfg.replace(**{"model.conv_stem": False}).model, tok)
    assert not any(isinstance(m, ConvStem) for m in plain.modules())


def test_short_qa_leaves_captions_out():
    recs = [Record("a", "p", b"x", "Name the shape.", "circle", "exact"),
            Record("b", "p", b"x", "Describe the image.", "a red circle and a blue square", "exact"),
            Record("c", "p", None, "Name the shape.", "square", "exact")]
    kept, questions, answers = short_qa(recs)
    assert [r.id for r in kept] == ["a"]  # caption (> CAPTION_WORDS words) and image-less record dropped
    assert len(recs[1].answer.split()) > CAPTION_WORDS
    assert questions == {"Name the shape.": 0} and answers == {"circle": 0}


def test_warm_up_trains_only_the_tower_and_learns_an_image_only_label(tiny_cfg, tok):
    torch.manual_seed(0)
    vlm = VLM(build_tiny_llava(tiny_cfg.model, tok), compact_processor(tiny_cfg.model, tiny_cfg.data, tok), tiny_cfg.model)
    rng = np.random.default_rng(0)
    recs = []
    for i in range(64):
        shape = ("circle", "square")[i % 2]
        recs.append(Record(str(i), "p", shape_png(shape, shift=int(rng.integers(-3, 4))), "Name the shape.", shape,
                           "exact"))
    before = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
    stats = warm_up_vision(vlm, recs, steps=60, batch_size=16, lr=3e-3, seed=0, log=lambda m: None)
    assert stats["vision_warmup_classes"] == 2
    assert stats["vision_warmup_accuracy"] > 0.9  # the answer is only in the pixels
    changed = {n for n, p in vlm.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.vision_tower.") for n in changed)
    assert not any(p.requires_grad for p in vlm.model.model.vision_tower.parameters())


def test_question_head_only_scores_the_answers_its_question_was_seen_with():
    recs = [Record("a", "p", b"x", "Name the shape.", "circle", "exact"),
            Record("b", "p", b"x", "Name the shape.", "square", "exact"),
            Record("c", "p", b"x", "Name the colour.", "red", "exact")]
    kept, questions, answers = short_qa(recs)
    allowed = allowed_answers(kept, questions, answers)
    assert allowed.sum() == 3 and allowed.shape == (2, 3)
    torch.manual_seed(0)
    head = QuestionHead(16, allowed)
    q = torch.tensor([questions["Name the shape."], questions["Name the colour."]])
    probs = torch.softmax(head(torch.randn(2, 5, 16), q), dim=-1)
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    assert probs[0, answers["red"]] == 0 and probs[1, answers["circle"]] == 0 and probs[1, answers["square"]] == 0
    assert probs[1, answers["red"]] == 1  # the only answer "Name the colour." was seen with
