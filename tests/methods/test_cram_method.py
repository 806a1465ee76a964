"""Cram through the ContinualMethod interface on a toy vision-language model (milliseconds)."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from cram_ray.config import CramConfig, StreamConfig
from cram_ray.data.records import TaskInfo
from cram_ray.methods import make_method
from cram_ray.methods.cram.method import Cram

IMG = 3  # image placeholder token id
VOCAB, D, N_IMG, PIX, D_IMG, D_TXT = 32, 16, 4, 6, 5, 8


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):  # (B, T, D)
        att = self.q_proj(x) @ self.k_proj(x).transpose(1, 2) / D ** 0.5  # (B, T, T)
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        return x + self.o_proj(att @ self.v_proj(x))


class ToyVLM(nn.Module):
    """Image tokens are replaced by projected pixel vectors; the vision part has a q_proj too."""

    def __init__(self, n_layers=2):
        super().__init__()
        self.config = SimpleNamespace(image_token_id=IMG)
        self.vision = nn.ModuleDict({"q_proj": nn.Linear(PIX, D)})
        self.language_model = nn.ModuleDict({
            "embed": nn.Embedding(VOCAB, D),
            "layers": nn.ModuleList([_Block() for _ in range(n_layers)]),
            "head": nn.Linear(D, VOCAB),
        })

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None):
        lm = self.language_model
        x = lm["embed"](input_ids)
        if pixel_values is not None:
            x = x.masked_scatter((input_ids == IMG)[..., None], self.vision["q_proj"](pixel_values))
        for block in lm["layers"]:
            x = block(x)
        logits = lm["head"](x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


TXT = torch.eye(D_TXT) * 4.0  # distinct instructions per "text id"
CENTROIDS = torch.tensor([[4.0, 0, 0, 0, 0], [0, 4.0, 0, 0, 0], [0, 0, 4.0, 0, 0]])



def make_batch(task, text_id, g, size=8, has_image=True):
    """Task ``task``: image features around its centroid, answer token 20 + task."""
    ids = torch.cat([torch.full((size, N_IMG), IMG), torch.full((size, 1), 10 + text_id),
                     torch.full((size, 1), 20 + task)], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = 20 + task
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.randn(size, N_IMG, PIX, generator=g) + task,
        "task_index": torch.full((size,), task),
        "has_image": torch.full((size,), has_image),
        "img_feat": CENTROIDS[task] + 0.5 * torch.randn(size, D_IMG, generator=g),
        "txt_feat": TXT[text_id] + 0.1 * torch.randn(size, D_TXT, generator=g),
    }


def model_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}


def make_cfg(**cram):
    cfg = StreamConfig()
    defaults = dict(buf_rank=6, rank_min=1, rank_max=4, tau_alloc=0.01, tau_novel=0.3, probe_ratio=0.25,
                    router="rbf", top_k=0, lambda_dec=1.0)
    defaults.update(cram)
    train_centroid = defaults.pop("train_centroid", False)
    cfg.method.cram = CramConfig(**defaults)
    cfg.method.cram.train_centroid = train_centroid  # optional field, read with getattr by Cram
    return cfg


def fresh(cfg, seed=0):
    torch.manual_seed(seed)
    model = ToyVLM()
    method = Cram(cfg)
    method.attach(model)
    return model, method


def steps(model, method, batches, observe=None):
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=2e-2, weight_decay=0.01)
    for i, batch in enumerate(batches):
        if observe:
            method.observe(batch, observe)
        method.route(batch, training=True)
        out = model(**model_inputs(batch))
        loss = out.loss + sum(method.extra_losses(batch, out).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method.before_optimizer_step(i)
        opt.step()


def probe_allocate(model, method, task, text_id, g, total=8):
    method.begin_task(TaskInfo(task, f"t{task}", "exact"))
    n = method.probe_steps(total)
    if n:
        method.begin_probe()
        steps(model, method, [make_batch(task, text_id, g) for _ in range(n)], observe="probe")
    probe = method.end_probe()
    alloc = method.allocate()
    return probe, alloc, total - n


def train_and_commit(model, method, task, text_id, g, n):
    method.begin_train()
    steps(model, method, [make_batch(task, text_id, g) for _ in range(n)])
    with torch.no_grad():
        for _ in range(3):
            method.observe(make_batch(task, text_id, g, size=16), "aggregate")
    return method.end_task()


def run_task(model, method, task, text_id, g, total=8):
    probe, alloc, n = probe_allocate(model, method, task, text_id, g, total)
    end = train_and_commit(model, method, task, text_id, g, n)
    return probe, alloc, end


def roundtrip(method, cfg, tmp_path, seed=0):
    """Save as safetensors + JSON, restore into a fresh process-like copy."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    tensors, meta = method.state()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "state.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps(meta))
    model, restored = fresh(cfg, seed)
    restored.load_state(load_file(str(tmp_path / "state.safetensors")), json.loads((tmp_path / "state.json").read_text()))
    return model, restored


def slot_params(method, slot):
    return {n: (l.slot(slot).A.detach().clone(), l.slot(slot).B.detach().clone()) for n, l in method.layers.items()}


def test_registry_and_probe_steps():
    cfg = make_cfg(probe_ratio=0.05)
    assert isinstance(make_method(cfg), Cram)
    m = Cram(cfg)
    assert (m.probe_steps(200), m.probe_steps(10), m.probe_steps(1)) == (10, 1, 1)
    assert Cram(make_cfg(probe_ratio=0.0)).probe_steps(200) == 0
    assert Cram(make_cfg(probe_ratio=0.07)).probe_steps(100) == 7
    assert Cram.needs_features == {"image", "text"}


def test_attach_wraps_language_attention_only_and_reads_the_image_token():
    model, m = fresh(make_cfg())
    assert len(m.layers) == 8 and all(n.startswith("language_model.layers.") for n in m.layers)
    assert isinstance(model.vision["q_proj"], nn.Linear)
    assert m.image_token_id == IMG
    assert not any(p.requires_grad for p in model.parameters())


def test_probe_trains_only_the_buffer_with_all_mass_on_it():
    model, m = fresh(make_cfg())
    g = torch.Generator().manual_seed(0)
    m.begin_task(TaskInfo(0, "t0", "exact"))
    m.begin_probe()
    batch = make_batch(0, 0, g)
    m.route(batch, training=True)
    assert m.context.probe and m.context.weights is None
    model(**model_inputs(batch)).loss.backward()
    trainable = {id(p) for p in m.trainable_parameters()}
    assert len(trainable) == 16
    for p in model.parameters():
        assert (p.grad is not None) == (id(p) in trainable)


def test_first_task_opens_a_group_and_allocates_variable_ranks():
    model, m = fresh(make_cfg())
    g = torch.Generator().manual_seed(1)
    probe, alloc, end = run_task(model, m, 0, 0, g)
    assert probe["group"] == 0 and probe["new_group"]
    assert alloc["slot"] == 0 and alloc["layers_from_probe"] == 8 and 1 <= alloc["rank_max"] <= 4
    assert alloc["rank_sum"] == sum(alloc["per_layer"].values())
    assert m.params_added() == sum(r * (D + D) for r in alloc["per_layer"].values())
    assert m.ranks() == {k: alloc[k] for k in ("per_layer", "rank_max", "rank_sum", "rank_mean")}
    assert end["experts"] == 1 and end["groups"] == 1
    assert m.slots == [{"slot": 0, "task": 0, "name": "t0", "group": 0}]


def test_old_experts_are_bit_identical_after_training_a_new_task():
    model, m = fresh(make_cfg(train_centroid=True))
    g = torch.Generator().manual_seed(2)
    run_task(model, m, 0, 0, g)
    old = slot_params(m, 0)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." not in n and ".buffer." not in n}
    probe, _, _ = run_task(model, m, 1, 0, g)  # same instruction: joins group 0, L_dec active
    assert probe["group"] == 0 and not probe["new_group"]
    for name, (A, B) in old.items():
        assert torch.equal(m.layers[name].slot(0).A, A) and torch.equal(m.layers[name].slot(0).B, B)
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n


def test_only_the_new_slot_and_its_centroid_receive_gradient():
    model, m = fresh(make_cfg(train_centroid=True))
    g = torch.Generator().manual_seed(3)
    run_task(model, m, 0, 0, g)
    _, _, n = probe_allocate(model, m, 1, 0, g)
    m.begin_train()
    batch = make_batch(1, 0, g)
    batch["img_feat"] = 0.5 * (CENTROIDS[0] + CENTROIDS[1]) + 0.3 * torch.randn(8, D_IMG, generator=g)  # soft routing
    m.route(batch, training=True)
    out = model(**model_inputs(batch))
    losses = m.extra_losses(batch, out)
    assert losses["dec"].item() > 0
    (out.loss + losses["dec"]).backward()
    new = {id(p) for l in m.layers.values() for p in l.slot(1).parameters()}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (id(p) in new), name
    assert m.centroid.grad is not None and m.centroid.grad.abs().sum() > 0
    assert {id(p) for p in m.trainable_parameters()} == new | {id(m.centroid)}


def test_decoupling_penalty_gradient_flows_only_into_the_new_slot():
    model, m = fresh(make_cfg())
    g = torch.Generator().manual_seed(4)
    run_task(model, m, 0, 0, g)
    probe_allocate(model, m, 1, 0, g)
    m.begin_train()
    batch = make_batch(1, 0, g)
    m.route(batch, training=True)
    dec = m.extra_losses(batch, model(**model_inputs(batch)))["dec"]
    dec.backward()
    new = {id(p) for l in m.layers.values() for p in l.slot(1).parameters()}
    grads = {id(p) for p in model.parameters() if p.grad is not None}
    assert grads and grads <= new


def test_decoupling_penalty_is_zero_for_a_new_group():
    model, m = fresh(make_cfg())
    g = torch.Generator().manual_seed(5)
    run_task(model, m, 0, 0, g)
    probe, _, _ = probe_allocate(model, m, 1, 1, g)  # a different instruction: new group
    assert probe["new_group"] and probe["group"] == 1
    m.begin_train()
    batch = make_batch(1, 1, g)
    m.route(batch, training=True)
    assert m.context.weights[:, 1].tolist() == [1.0] * 8 and m.context.weights[:, 0].abs().sum() == 0
    assert m.extra_losses(batch, model(**model_inputs(batch)))["dec"].item() == 0.0


def test_training_routes_over_the_group_with_the_new_centroid_included():
    model, m = fresh(make_cfg())
    g = torch.Generator().manual_seed(6)
    run_task(model, m, 0, 0, g)
    probe_allocate(model, m, 1, 0, g)
    m.begin_train()
    m.route(make_batch(1, 0, g), training=True)
    pi = m.context.weights
    assert pi.shape == (8, 2)
    torch.testing.assert_close(pi.sum(1), torch.ones(8))
    assert (pi[:, 1] > 0.5).all()  # the task's own samples lie at the new centroid
    m.route(make_batch(1, 0, g, has_image=False), training=True)
    assert m.context.weights[:, 1].tolist() == [1.0] * 8  # no image: the task's own expert trains
    assert m._gamma.tolist() == [0.0] * 8  # and no routing mass on old experts to penalise


def test_inference_routes_every_task_to_its_own_expert():
    for router in ("rbf", "lda"):
        model, m = fresh(make_cfg(router=router))
        g = torch.Generator().manual_seed(7)
        run_task(model, m, 0, 0, g)
        run_task(model, m, 1, 1, g)  # own group
        run_task(model, m, 2, 0, g)  # joins task 0's group; level 2 must split them by image
        assert [s["group"] for s in m.slots] == [0, 1, 0]
        for task, text_id in ((0, 0), (1, 1), (2, 0)):
            batch = make_batch(task, text_id, g, size=16)
            m.route(batch, training=False)
            assert m.routed_task().tolist() == [task] * 16, router
            assert not m.context.probe


def test_state_round_trips_exactly_through_safetensors_and_json(tmp_path):
    cfg = make_cfg(router="lda", train_centroid=True)
    model, m = fresh(cfg)
    g = torch.Generator().manual_seed(8)
    for task, text_id in ((0, 0), (1, 1), (2, 0)):
        run_task(model, m, task, text_id, g)
    model2, m2 = roundtrip(m, cfg, tmp_path)
    assert m2.slots == m.slots and m2.ranks() == m.ranks() and m2.params_added() == m.params_added()
    batch = make_batch(2, 0, g, size=12)
    batch["img_feat"] = batch["img_feat"] + torch.randn(12, D_IMG, generator=g)  # make routing soft
    with torch.no_grad():
        m.route(batch, training=False)
        a = model(**model_inputs(batch)).logits
        m2.route(batch, training=False)
        b = model2(**model_inputs(batch)).logits
    assert torch.equal(m.context.weights, m2.context.weights)
    assert torch.equal(a, b)
    assert torch.equal(m.routed_task(), m2.routed_task())


def test_resuming_between_stages_equals_an_uninterrupted_task(tmp_path):
    cfg = make_cfg(router="lda", train_centroid=True)
    results = []
    for interrupted in (False, True):
        model, m = fresh(cfg)
        g = torch.Generator().manual_seed(9)
        run_task(model, m, 0, 0, g)
        m.begin_task(TaskInfo(1, "t1", "exact"))
        n = m.probe_steps(8)
        m.begin_probe()
        steps(model, m, [make_batch(1, 0, g) for _ in range(n)], observe="probe")
        m.end_probe()
        if interrupted:
            model, m = roundtrip(m, cfg, tmp_path / "probed")
        m.allocate()
        if interrupted:
            model, m = roundtrip(m, cfg, tmp_path / "allocated")
        m.begin_train()
        steps(model, m, [make_batch(1, 0, g) for _ in range(8 - n)])
        if interrupted:
            model, m = roundtrip(m, cfg, tmp_path / "trained")
        with torch.no_grad():
            m.observe(make_batch(1, 0, g, size=16), "aggregate")
        m.end_task()
        results.append((slot_params(m, 1), m.router.centroid(1), m.groups.prototypes()))
    (p1, c1, g1), (p2, c2, g2) = results
    for name in p1:
        assert torch.equal(p1[name][0], p2[name][0]) and torch.equal(p1[name][1], p2[name][1])
    assert torch.equal(c1, c2) and torch.equal(g1, g2)


def test_without_a_probe_the_first_training_batch_decides_the_group():
    model, m = fresh(make_cfg(probe_ratio=0.0))
    g = torch.Generator().manual_seed(10)
    probe, alloc, n = probe_allocate(model, m, 0, 0, g)
    assert probe["group"] is None and alloc["layers_from_probe"] == 0 and alloc["rank_max"] == 1 and n == 8
    train_and_commit(model, m, 0, 0, g, n)
    probe, alloc, n = probe_allocate(model, m, 1, 0, g)
    m.begin_train()
    m.route(make_batch(1, 0, g), training=True)
    assert m.decision.group == 0 and not m.decision.new
    for layer in m.layers.values():  # LoRA start, orthogonal to... nothing known yet, B = 0
        assert torch.equal(layer.slot(1).B, torch.zeros_like(layer.slot(1).B))


def test_calls_out_of_order_raise_clear_errors():
    model, m = fresh(make_cfg())
    with pytest.raises(RuntimeError, match="begin_probe"):
        m.begin_probe()
    with pytest.raises(RuntimeError, match="begin_probe or begin_train"):
        m.route(make_batch(0, 0, torch.Generator()), training=True)
    m.route(make_batch(0, 0, torch.Generator()), training=False)  # nothing committed: the base model
    assert m.routed_task().tolist() == [-1] * 8 and m.context.weights is None
