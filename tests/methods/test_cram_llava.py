"""Cram on a real (tiny, randomly initialised) transformers Llava: image-token capture and L_dec."""
import pytest
import torch

from cram_ray.config import CramConfig, StreamConfig
from cram_ray.data.records import TaskInfo
from cram_ray.methods.cram.method import Cram

transformers = pytest.importorskip("transformers")

IMG, VOCAB, N_IMG = 63, 64, 4



def _llava():
    vc = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=16, patch_size=8)
    tc = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG)).eval()


def _batch(task, g, size=4):
    ids = torch.cat([torch.full((size, 1), 1), torch.full((size, N_IMG), IMG),
                     torch.randint(5, 40, (size, 3), generator=g), torch.full((size, 1), 50 + task)], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = 50 + task
    return {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
        "pixel_values": torch.randn(size, 3, 16, 16, generator=g),
        "task_index": torch.full((size,), task), "has_image": torch.ones(size, dtype=torch.bool),
        "img_feat": torch.randn(size, 6, generator=g) + 3.0 * task, "txt_feat": torch.arange(5.0).repeat(size, 1),
    }


def _steps(model, m, batches, observe=None):
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2)
    for batch in batches:
        if observe:
            m.observe(batch, observe)
        m.route(batch, training=True)
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")})
        losses = m.extra_losses(batch, out)
        opt.zero_grad()
        (out.loss + sum(losses.values())).backward()
        opt.step()
    return losses


def test_two_tasks_in_one_group_on_llava():
    cfg = StreamConfig()
    cfg.method.cram = CramConfig(buf_rank=4, rank_min=1, rank_max=3, tau_alloc=0.0, tau_novel=0.3, probe_ratio=0.25)
    model = _llava()
    m = Cram(cfg)
    m.attach(model)
    assert m.image_token_id == IMG and len(m.layers) == 8
    g = torch.Generator().manual_seed(0)
    for task in (0, 1):
        m.begin_task(TaskInfo(task, f"t{task}", "exact"))
        m.begin_probe()
        _steps(model, m, [_batch(task, g)], observe="probe")
        assert m.end_probe()["group"] == 0  # identical instructions: one group
        m.allocate()
        m.begin_train()
        losses = _steps(model, m, [_batch(task, g) for _ in range(3)])
        if task == 1:
            assert losses["dec"].item() > 0  # captured means over the 4 image positions of every layer
            for layer in m.layers.values():
                assert layer.captured is None  # released after the loss
        with torch.no_grad():
            m.observe(_batch(task, g, size=8), "aggregate")
        m.end_task()
    m.route(_batch(1, g), training=False)
    assert m.routed_task().tolist() == [1] * 4
