"""The distributed step equals the in-process loop bit for bit on one rank, and resumes exactly."""
import pytest
import torch

from cram_ray.config import TrainConfig
from cram_ray.train.fit import FitProgress, engine_fit
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


@pytest.mark.parametrize("saved_stage, resumed_stage", [(2, -1), (-1, 3), (3, 0)])
def test_a_checkpoint_resumes_under_another_layout_exactly(process_group, tmp_path, saved_stage, resumed_stage):
    """The moments are saved whole by name: the resuming engine re-partitions them as it needs."""
    model, method = make()
    engine_fit(model, method, iter(batches(STEPS)), STEPS, _train(zero_stage=resumed_stage), log_every=0)
    expected = [p.detach().clone() for p in method.trainable_parameters()]

    def checkpoint(stepper, progress: FitProgress):
        if progress.step == 3:
            stepper.save(tmp_path / "ckpt", progress)

    model, method = make()
    engine_fit(model, method, iter(batches(STEPS)), STEPS, _train(zero_stage=saved_stage), log_every=0,
               checkpoint=checkpoint)
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"trainable.safetensors", "optimizer.safetensors",
                                                              "progress.json"}  # nothing to unpickle
    model, method = make()
    engine_fit(model, method, iter(batches(STEPS)[3:]), STEPS, _train(zero_stage=resumed_stage), log_every=0,
               resume=tmp_path / "ckpt")
    for a, b in zip(expected, method.trainable_parameters()):
        assert torch.equal(a, b.detach())
