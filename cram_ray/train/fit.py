"""Data-parallel optimizer steps of a method: DeepSpeed ZeRO 0-3, or plain torch gradient all-reduce.

:func:`engine_fit` is the distributed twin of ``loop.fit_steps``: the same step (``loop.compute_loss``,
backward, ``method.before_optimizer_step``, AdamW, warm-up + cosine LR) on a process group that
already exists (Ray Train creates it; tests create a one-rank gloo group). On one rank its updates
are bit-identical to ``fit_steps`` (tests/train/test_fit.py): ZeRO's flat fp32 partitions run the
same element-wise AdamW arithmetic. (ZeRO-3 on the real VLM lands within ~1e-6: DeepSpeed routes
every ``F.linear`` of the process through its own matmul while a stage-3 engine exists.)

Gradient surgery (``before_optimizer_step``) needs whole gradients, which ZeRO keeps in its own
partitioned buffers after backward: for methods that override the hook, the full gradient of every
trainable parameter is assembled into ``p.grad`` (a collective, on every rank), the hook edits it,
and the result is written back. Methods that don't override it pay nothing.

Checkpoints (:meth:`Stepper.save`) are directories of safetensors + JSON only: the trainable
parameters, every parameter's AdamW moments (and DeepSpeed's fp32 master copy) gathered whole and
keyed by parameter name, and the progress (step, summed logs). They do not depend on the world size
or ZeRO stage: :meth:`Stepper.load` re-partitions them into whatever engine the restarted worker
group built (DeepSpeed's ``safe_set_full_*`` API), so an elastic restart on fewer workers resumes
with the same optimizer state, and nothing is ever unpickled. No Ray import here.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from cram_ray.config import TrainConfig
from cram_ray.methods.base import Batch, ContinualMethod
from cram_ray.train.loop import accumulate, compute_loss, cosine_lambda, make_optimizer
from cram_ray.train.progress import StepProgress
from cram_ray.train.zero import deepspeed_config, optimizer_factory, schedule_factory, uses_deepspeed

PARAMS_FILE = "trainable.safetensors"
PROGRESS_FILE = "progress.json"
OPTIM_TENSORS = "optimizer.safetensors"  # "<param name>::<exp_avg | exp_avg_sq | master>"
MOMENTS = ("exp_avg", "exp_avg_sq")  # the per-parameter state of torch AdamW (loop.make_optimizer)
MASTER = "master"  # DeepSpeed's fp32 copy of a parameter, which its optimizer step writes back
SEP = "::"


def default_extensions_dir() -> str:
    """A persistent home for DeepSpeed's JIT-built ops (the first build takes ~90 s)."""
    return str(Path(sys.prefix) / "torch_extensions")


SHM_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's shared-memory all-reduce between CPU ranks on one host


def import_deepspeed(*, cpu_ranks: int = 0):
    """Import DeepSpeed with its op cache in a persistent directory (not /tmp).

    ``cpu_ranks``: how many CPU ranks the run has (0: not a CPU run). DeepSpeed's CPU backend
    JIT-compiles its shared-memory all-reduce op when its communication starts (~30 s on 2 cores,
    once per environment); a single CPU rank never reduces across processes, so the op is marked
    unavailable in DeepSpeed's own table of compatible ops and is neither built nor loaded.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    import deepspeed

    if cpu_ranks == 1:
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    return deepspeed


def overrides_surgery(method: ContinualMethod) -> bool:
    """Whether the method edits gradients between backward and the optimizer step."""
    return type(method).before_optimizer_step is not ContinualMethod.before_optimizer_step


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class StepModule(nn.Module):
    """The model and the method's loss as one module: ``forward(batch) -> (loss, logs)``.

    DeepSpeed wraps this module, so its forward is exactly ``loop.compute_loss``. Trainable
    parameters the method holds outside the model (e.g. a routing centroid) are registered here
    so ZeRO treats them like any other parameter.
    """

    def __init__(self, model: nn.Module, method: ContinualMethod, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.model = model
        self.method = method  # not a module: plain attribute
        inside = {id(p) for p in model.parameters()}
        for i, p in enumerate(q for q in params if id(q) not in inside):
            self.register_parameter(f"extra_{i}", p)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        return compute_loss(self.model, self.method, batch)


def param_names(model: nn.Module, params: list[nn.Parameter]) -> list[str]:
    """Stable names of ``params``: their model path, or ``extra.<i>`` for parameters outside it."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    names, extra = [], 0
    for p in params:
        if id(p) in by_id:
            names.append(by_id[id(p)])
        else:
            names.append(f"extra.{extra}")
            extra += 1
    return names


@dataclass
class FitProgress:
    """Where a fit stands: JSON-able, saved with every checkpoint."""

    step: int = 0
    steps: int = 0
    totals: dict[str, float] = field(default_factory=dict)  # summed per-step logs (rank-averaged)
    count: int = 0
    world_size: int = 1
    zero_stage: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "FitProgress":
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


class Stepper:
    """One data-parallel optimizer over ``method.trainable_parameters()`` for ``steps`` steps."""

    def __init__(self, model: nn.Module, method: ContinualMethod, steps: int, train: TrainConfig,
                 *, dtype: str = "float32") -> None:
        self.model = model
        self.method = method
        self.train = train
        self.steps = steps
        self.rank, self.world_size = world()
        self.params = method.trainable_parameters()
        if not self.params:
            raise ValueError("the method exposes no trainable parameters for this phase")
        self.names = param_names(model, self.params)
        self.module = StepModule(model, method, self.params)
        self.surgery = overrides_surgery(method)
        self.deepspeed = uses_deepspeed(train)
        if self.deepspeed:
            ds = import_deepspeed(cpu_ranks=0 if train.use_gpu else self.world_size)
            self.engine, _, _, _ = ds.initialize(
                model=self.module, model_parameters=self.params,
                optimizer=optimizer_factory(train), lr_scheduler=schedule_factory(train, steps),
                config=deepspeed_config(train, world_size=self.world_size, dtype=dtype,
                                        bucket_elements=sum(p.numel() for p in self.params)),
            )
        else:
            self.optimizer = make_optimizer(self.params, train.lr, train.weight_decay)
            self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, cosine_lambda(steps, train.warmup_ratio))

    # -- one step ----------------------------------------------------------------------------
    def step(self, batch: Batch, step: int) -> dict[str, float]:
        """Forward, backward, surgery, optimizer + LR step; returns this rank's loss terms."""
        if self.deepspeed:
            def backward(loss: torch.Tensor, parts: int) -> None:
                self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
                if self.surgery and self.engine.is_gradient_accumulation_boundary():
                    self._surgery_zero(step)
                self.engine.step()  # an optimizer step at the accumulation boundary only

            return accumulate(self.engine, batch, self.train.grad_accum, backward)
        self.optimizer.zero_grad(set_to_none=True)
        logs = accumulate(self.module, batch, self.train.grad_accum,
                          lambda loss, parts: (loss / parts).backward())
        self._all_reduce_grads()
        self.method.before_optimizer_step(step)
        self.optimizer.step()
        self.schedule.step()
        return logs

    def _all_reduce_grads(self) -> None:
        """Average the gradients over the ranks (one flat all-reduce; plain data parallel)."""
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def _surgery_zero(self, step: int) -> None:
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        if self.train.zero_stage == 0:  # no ZeRO: DeepSpeed leaves the averaged gradients in p.grad
            self.method.before_optimizer_step(step)
            return
        for p in self.params:  # collective: same order on every rank
            p.grad = safe_get_full_grad(p).clone()
        self.method.before_optimizer_step(step)
        for p in self.params:
            grad, p.grad = p.grad, None
            safe_set_full_grad(p, grad)

    def whole(self):
        """Context in which ZeRO-3's partitioned parameters are whole (a collective: every rank)."""
        if self.deepspeed and self.train.zero_stage == 3:
            return import_deepspeed().zero.GatheredParameters(list(self.module.parameters()))
        return contextlib.nullcontext()

    def close(self) -> None:
        """Hand the model back as plain torch: DeepSpeed's hooks removed, ZeRO-3 parameters whole."""
        if not self.deepspeed:
            return
        if self.train.zero_stage == 3:
            params = list(self.module.parameters())
            with self.whole():
                full = [p.data.clone() for p in params]
            self.engine.destroy()
            for p, data in zip(params, full):
                p.data = data
        else:
            self.engine.destroy()

    def lr(self) -> float:
        sched = self.engine.lr_scheduler if self.deepspeed else self.schedule
        return float(sched.get_last_lr()[0])

    # -- checkpoints -------------------------------------------------------------------------
    def _partitioner(self) -> Any:
        """DeepSpeed's optimizer wrapper that owns fp32 masters and partitioned state (ZeRO 1-3, bf16),
        or None when a torch AdamW holds the parameters' state directly (plain path, fp32 ZeRO-0)."""
        if not self.deepspeed:
            return None
        opt = self.engine.optimizer
        return None if isinstance(opt, torch.optim.Optimizer) else opt

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        wrapper = self._partitioner()
        if wrapper is not None:
            return wrapper.optimizer
        return self.engine.optimizer if self.deepspeed else self.optimizer

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter's AdamW moments, whole, by name (plus the fp32 master copy
        where DeepSpeed keeps one). A collective under ZeRO: every rank calls it, same order."""
        out: dict[str, torch.Tensor] = {}
        wrapper = self._partitioner()
        if wrapper is not None:
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            for n, p in zip(self.names, self.params):
                for key in MOMENTS:
                    out[f"{n}{SEP}{key}"] = safe_get_full_optimizer_state(p, key)
                out[f"{n}{SEP}{MASTER}"] = safe_get_full_fp32_param(p)
        else:
            state = self._torch_optimizer().state
            for n, p in zip(self.names, self.params):
                out.update({f"{n}{SEP}{key}": state[p][key] for key in MOMENTS})
        return {k: v.detach().contiguous().cpu().clone() for k, v in out.items()}

    def save(self, directory: Path, progress: FitProgress) -> None:
        """Write a checkpoint into ``directory`` (a rank-local dir). EVERY rank must call this.

        Everything is whole tensors by parameter name (safetensors) + JSON, independent of the
        world size and ZeRO stage: a restart on another number of workers re-partitions it.
        """
        directory.mkdir(parents=True, exist_ok=True)
        moments = self.optimizer_tensors()
        with self.whole():
            tensors = {n: p.detach().contiguous().cpu().clone() for n, p in zip(self.names, self.params)}
        if self.rank == 0:
            save_file(tensors, str(directory / PARAMS_FILE))
            save_file(moments, str(directory / OPTIM_TENSORS))
            (directory / PROGRESS_FILE).write_text(json.dumps(progress.to_json(), indent=1, sort_keys=True))

    def load(self, directory: Path, progress: FitProgress) -> None:
        """Restore :meth:`save`'s parameters, AdamW state and LR schedule (every rank, any world size).

        DeepSpeed's own checkpoint loader is never used: it unpickles files that anyone who can
        write the run's storage could have replaced.
        """
        tensors = load_file(str(directory / PARAMS_FILE))
        moments = load_file(str(directory / OPTIM_TENSORS))
        missing = [n for n in self.names if n not in tensors or f"{n}{SEP}{MOMENTS[0]}" not in moments]
        if missing:
            raise ValueError(f"{directory}: no saved tensor or optimizer state for trainable parameter(s) {missing[:3]}")
        with self.whole(), torch.no_grad():
            for n, p in zip(self.names, self.params):
                p.copy_(tensors[n].to(p.dtype))
        opt = self._torch_optimizer()
        wrapper = self._partitioner()
        # ZeRO-3 hands its flat fp32 partitions to the optimizer's param groups only during its step
        flats = getattr(wrapper, "fp32_partitioned_groups_flat", None) or \
            [flat for group in opt.param_groups for flat in group["params"]]
        for flat in flats:  # the state AdamW creates at its first step, at the saved step
            opt.state[flat] = {"step": torch.tensor(float(progress.step), dtype=torch.float32),
                               **{key: torch.zeros_like(flat) for key in MOMENTS}}
        if wrapper is not None:
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            link = getattr(wrapper, "_lazy_init_hp_params_optimizer_state", None)
            if link is not None:  # ZeRO-1/2 and bf16 point each parameter's slice at the state
                link()
            for n, p in zip(self.names, self.params):
                for key in MOMENTS:
                    safe_set_full_optimizer_state(p, moments[f"{n}{SEP}{key}"].to(p.device), key)
                # a checkpoint of the plain path has no separate master: its parameters are fp32
                master = moments.get(f"{n}{SEP}{MASTER}", tensors[n]).to(p.device, torch.float32)
                safe_set_full_fp32_param(p, master)
        else:
            with torch.no_grad():
                for n, p in zip(self.names, self.params):
                    for key in MOMENTS:
                        opt.state[p][key].copy_(moments[f"{n}{SEP}{key}"])
        schedule = self.engine.lr_scheduler if self.deepspeed else self.schedule
        with warnings.catch_warnings():  # torch warns of a schedule stepped before its optimizer
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(progress.step):
                schedule.step()


def reduce_logs(totals: dict[str, float], count: int) -> dict[str, float]:
    """Mean of the per-step logs over the steps and the ranks (a collective when distributed)."""
    keys = sorted(totals)
    rank, size = world()
    if size > 1 and keys:
        vec = torch.tensor([totals[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(vec)
        totals = {k: float(v) / size for k, v in zip(keys, vec)}
    return {k: totals[k] / max(1, count) for k in keys}


def engine_fit(
    model: nn.Module,
    method: ContinualMethod,
    batches: Iterator[Batch],
    steps: int,
    train: TrainConfig,
    *,
    dtype: str = "float32",
    observe: Optional[Callable[[Batch], None]] = None,
    log: Callable[[str], None] = print,
    log_every: int = 50,
    resume: Optional[Path] = None,
    checkpoint: Optional[Callable[[Stepper, FitProgress], None]] = None,
    reporter: Optional[StepProgress] = None,
    timings: Optional[dict[str, float]] = None,
) -> dict[str, float]:
    """``steps`` data-parallel optimizer steps; returns the mean loss terms (over steps and ranks).

    Args:
        batches: this rank's batches (``train.batch_size / world_size`` samples each).
        observe: sees every batch before its step (no grad), like ``fit_steps``.
        resume: a directory :meth:`Stepper.save` wrote; the fit continues at its step. ``batches``
            must then start at that step's batch (the caller skips what was consumed).
        checkpoint: ``(stepper, progress)`` after every step; the caller decides whether to save
            (every rank must make the same decision: saving is a collective).
        reporter: reports rank 0's steps and keeps its loss curve (the caller closes it); without
            one, rank 0 prints a line to ``log`` every ``log_every`` steps.
        timings: receives ``engine_setup``, the seconds spent building the engine (set-up, not compute).
    """
    t0 = time.time()
    stepper = Stepper(model, method, steps, train, dtype=dtype)
    if timings is not None:
        timings["engine_setup"] = time.time() - t0
    if stepper.rank == 0:
        log(f"  engine ready in {time.time() - t0:.1f}s ({'ZeRO-%d' % train.zero_stage if stepper.deepspeed else 'plain data parallel'}, "
            f"{stepper.world_size} rank(s))")
    t_loop = time.time()
    progress = FitProgress(steps=steps, world_size=stepper.world_size, zero_stage=train.zero_stage)
    if resume is not None:
        saved = FitProgress.from_json(json.loads((resume / PROGRESS_FILE).read_text()))
        if saved.steps != steps:
            raise ValueError(f"{resume}: checkpoint of a {saved.steps}-step fit, this fit has {steps} steps")
        stepper.load(resume, saved)
        progress.step, progress.totals, progress.count = saved.step, dict(saved.totals), saved.count
    own = reporter is None
    if own:
        reporter = StepProgress("step", steps, log=log, every_steps=log_every,
                                every_seconds=StepProgress.EVERY_SECONDS if log_every else 0, bar=False)
    reporter.begin(progress.step)
    model.train()
    for step in range(progress.step, steps):
        batch = next(batches)
        if observe is not None:
            with torch.no_grad():
                observe(batch)
        logs = stepper.step(batch, step)
        for k, v in logs.items():
            progress.totals[k] = progress.totals.get(k, 0.0) + v
        progress.count += 1
        progress.step = step + 1
        if stepper.rank == 0:
            reporter.update(progress.step, logs, extra=f" lr={stepper.lr():.2e}")
        if checkpoint is not None:
            checkpoint(stepper, progress)
    stepper.close()
    if own:
        reporter.close()
    if stepper.rank == 0 and progress.count:
        log(f"  {progress.count} steps in {time.time() - t_loop:.1f}s ({progress.count / max(1e-9, time.time() - t_loop):.2f} steps/s)")
    model.eval()
    if any(math.isnan(v) for v in progress.totals.values()):
        log("  warning: a loss term was NaN")
    return reduce_logs(progress.totals, progress.count)
