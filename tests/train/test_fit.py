"""The distributed step equals the in-process loop bit for bit on one rank, and resumes exactly."""
import pytest
import torch

from cram_ray.config import TrainConfig
from cram_ray.train.fit import FitProgress, engine_fit, load_adamw, save_adamw
from cram_ray.train.loop import fit_steps

from toys import SurgeryMethod, ToyMethod, batches, make

STEPS = 8
STAGES = [-1, 0, 1, 2, 3]


def _train(**kw) -> TrainConfig:
    return TrainConfig(batch_size=8, lr=5e-2, warmup_ratio=0.25, weight_decay=0.01, **kw)


def _local(cls):
    model, method = make(cls)
    tc = _train()
    fit_steps(model, method, iter(batches(STEPS)), STEPS, lr=tc.lr, warmup_ratio=tc.warmup_ratio,
              weight_decay=tc.weight_decay, log_every=0)
    return [p.detach().clone() for p in method.trainable_parameters()]


@pytest.mark.parametrize("cls", [ToyMethod, SurgeryMethod], ids=["plain", "surgery"])
@pytest.mark.parametrize("stage", STAGES)
def test_one_rank_matches_the_local_loop_exactly(process_group, stage, cls):
    expected = _local(cls)
    model, method = make(cls)
    logs = engine_fit(model, method, iter(batches(STEPS)), STEPS, _train(zero_stage=stage), log_every=0)
    got = [p.detach() for p in method.trainable_parameters()]
    assert set(logs) == {"ce", "pull"}
    for a, b in zip(expected, got):
        assert a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("stage", [-1, 2, 3])
def test_resume_from_a_checkpoint_equals_an_uninterrupted_fit(process_group, tmp_path, stage):
    tc = _train(zero_stage=stage)
    model, method = make()
    full = engine_fit(model, method, iter(batches(STEPS)), STEPS, tc, log_every=0)
    expected = [p.detach().clone() for p in method.trainable_parameters()]

    saved = {}

    def checkpoint(stepper, progress: FitProgress):
        if progress.step == 3:
            stepper.save(tmp_path / "ckpt", progress)
            saved["step"] = progress.step

    model, method = make()
    engine_fit(model, method, iter(batches(STEPS)), STEPS, tc, log_every=0, checkpoint=checkpoint)
    assert saved == {"step": 3}
    model, method = make()  # a fresh process would rebuild the same starting point
    resumed = engine_fit(model, method, iter(batches(STEPS)[3:]), STEPS, tc, log_every=0, resume=tmp_path / "ckpt")
    for a, b in zip(expected, method.trainable_parameters()):
        assert a.shape == b.shape and torch.equal(a, b.detach())
    assert resumed == pytest.approx(full, rel=1e-12)


def test_adamw_state_round_trips_without_pickle(tmp_path):
    model, method = make()
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2)
    for b in batches(3):
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_adamw(opt, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"optimizer.safetensors", "optimizer.json"}
    fresh = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2)
    load_adamw(fresh, tmp_path)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for idx in a["state"]:
        for key in a["state"][idx]:
            assert torch.equal(torch.as_tensor(a["state"][idx][key]), torch.as_tensor(b["state"][idx][key]))
