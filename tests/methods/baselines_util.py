"""Shared stand-ins for the baseline methods' tests: a tiny transformers Llama and synthetic tasks.

Task ``k`` of the synthetic stream: random prompt tokens, answer token ``40 + k``, image features
around ``IMG_CENTRES[k]`` and text features around ``TXT_CENTRES[k]``; the first sample of every
batch is left-padded so attention masks matter.
"""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cram_ray.config import StreamConfig
from cram_ray.data.records import TaskInfo
from cram_ray.methods import make_method

transformers = pytest.importorskip("transformers")

VOCAB, D_IMG, D_TXT, T = 48, 5, 6, 7
IMG_CENTRES = 3.0 * torch.eye(D_IMG)[:3]
TXT_CENTRES = 3.0 * torch.eye(D_TXT)[:3]
MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values")


def tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def make_cfg(method, rank=4, **settings):
    """A config of ``method`` with its own settings (``method.<name>.<key>``) replaced."""
    cfg = StreamConfig()
    cfg.method.name = method
    cfg.method.lora_rank = rank
    if settings:
        own = getattr(cfg.method, method)
        setattr(cfg.method, method, type(own)(**{**dataclasses.asdict(own), **settings}))
    return cfg


def fresh(cfg, seed=0):
    model = tiny_llama(seed)
    method = make_method(cfg)
    method.attach(model)
    return model, method


def make_batch(task, g, size=4, noise=0.3):
    ids = torch.randint(3, 30, (size, T), generator=g)
    ids[:, -1] = 40 + task
    mask = torch.ones(size, T, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded sample
    ids[0, :2] = 0
    labels = torch.full_like(ids, -100)
    labels[:, -1] = 40 + task
    return {
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "task_index": torch.full((size,), task), "has_image": torch.ones(size, dtype=torch.bool),
        "img_feat": IMG_CENTRES[task] + noise * torch.randn(size, D_IMG, generator=g),
        "txt_feat": TXT_CENTRES[task] + noise * torch.randn(size, D_TXT, generator=g),
    }


def mixed_batch(truth, g, noise=0.1):
    """A batch whose sample b has the routing features of task ``truth[b]``."""
    batch = make_batch(0, g, size=len(truth))
    batch["img_feat"] = IMG_CENTRES[truth] + noise * torch.randn(len(truth), D_IMG, generator=g)
    batch["txt_feat"] = TXT_CENTRES[truth] + noise * torch.randn(len(truth), D_TXT, generator=g)
    return batch


def model_inputs(batch):
    return {k: batch[k] for k in MODEL_KEYS if k in batch}


def train_steps(model, method, batches, lr=5e-2):
    """The pipeline's optimizer step (train/loop.py), written out."""
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=lr)
    model.train()
    for step, batch in enumerate(batches):
        method.route(batch, training=True)
        out = model(**model_inputs(batch))
        loss = out.loss + sum(method.extra_losses(batch, out).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method.before_optimizer_step(step)
        opt.step()
    model.eval()


def run_task(model, method, task, g, steps=3):
    """probe -> allocate -> train -> aggregate, as the pipeline's stages call them."""
    method.begin_task(TaskInfo(task, f"t{task}", "exact"))
    assert method.probe_steps(steps) == 0
    method.end_probe()
    method.allocate()
    method.begin_train()
    train_steps(model, method, [make_batch(task, g) for _ in range(steps)])
    if method.needs_features:
        with torch.no_grad():
            for _ in range(2):
                method.observe(make_batch(task, g, size=8), "aggregate")
    return method.end_task()


def roundtrip(method, cfg, tmp_path, seed=0):
    """state() -> safetensors + JSON on disk -> load_state() into a fresh model."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    tensors, meta = method.state()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(meta))
    model, restored = fresh(cfg, seed)
    restored.load_state(load_file(str(tmp_path / "state.safetensors")), json.loads((tmp_path / "state.json").read_text()))
    return model, restored


def assert_same_state(a, b):
    (ta, ma), (tb, mb) = a.state(), b.state()
    assert ma == mb
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def logits_of(model, method, batch):
    with torch.no_grad():
        method.route(batch, training=False)
        return model(**model_inputs(batch)).logits


def snapshot(params):
    return [p.detach().clone() for p in params]


def grads_only_on(model, allowed):
    """Names of parameters with a gradient that are not in ``allowed`` (ids)."""
    return [n for n, p in model.named_parameters() if p.grad is not None and id(p) not in allowed]
