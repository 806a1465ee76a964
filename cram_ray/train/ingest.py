"""Ray Data ingest of a task's training shards into the Train workers.

Two modes (``train.ingest``):

* ``stream`` (default): the task's shards are read once, decoded and tokenised in ``map_batches``,
  and handed to the workers by Ray Train's own ``DataConfig`` (``streaming_split(W, equal=True)``,
  order preserved, so which rows reach which rank is fixed by the data's block layout). Every epoch
  each rank draws ``(n // W) // micro`` micro-batches from its rows through a seeded local shuffle
  (``iter_torch_batches(local_shuffle_seed=...)``, seed from (seed, task, epoch, rank)); step ``g`` of
  the fused run is batch ``g % per_epoch`` of epoch ``g // per_epoch`` (:class:`ShardStream`), so a
  restarted run jumps to its step without replaying earlier epochs. Guarantees: every epoch the ranks
  draw equal numbers of batches whose union is the task's data (at most ``W * micro - 1`` rows of it
  left out, never a row twice), and the sequence is deterministic given the seed, the world size and
  the shards; it is not the in-process executor's sequence.
* ``exact``: the in-process executor's batches bit for bit, for tests. ``stages.train_stream``
  draws per epoch ``e`` a permutation ``default_rng([seed, task, e, len(salt)])`` of the records
  (in ``read_shards`` order), cut into full batches of ``min(batch_size, n)``; the probe and the
  train stage each start at epoch 0. :class:`StreamPlan` reproduces that sequence as data: every
  record is expanded into one row per place it takes in the stream (``seq``), the rows are sorted by
  ``seq``, decoded and tokenised in ``map_batches``, and each data-parallel rank receives, via
  ``trainer.RankSplit``, the rows of its share of every global batch (``dp_rank``). Each rank reads
  and sorts the whole task, which is what makes this mode slower. Only each shard's ``id`` column is
  read by the driver, where the plan is built (``id -> position``).

Padding happens per micro-batch (:func:`collate_train`), exactly as ``VLMProcessor.train_batch``
pads a batch (tests/train/test_ingest.py checks equality).
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Optional, Sequence, Union

import numpy as np
import pyarrow as pa

from cram_ray.data.records import DataError, Record
from cram_ray.pipeline.ledger import Storage

SHARD_GLOB = "part-*.parquet"
PLAN_COLUMNS = ("seq", "phase", "step", "slot", "shared")


# -- where the rows are ------------------------------------------------------------------------
def shard_paths(storage: Storage, rel: str) -> list[str]:
    """The split's shard files in ``read_shards`` order (sorted names), as paths of ``storage.fs``."""
    import pyarrow.fs as pafs

    selector = pafs.FileSelector(storage.path(rel), recursive=False)
    infos = [i for i in storage.fs.get_file_info(selector) if i.type == pafs.FileType.File]
    paths = sorted(i.path for i in infos if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))
    if not paths:
        raise DataError(f"{storage.path(rel)}: no shards (expected {SHARD_GLOB} files)")
    return paths


def shard_ids(storage: Storage, paths: Sequence[str]) -> list[str]:
    """The ``id`` column of every shard, in order (the only column the planner reads)."""
    import pyarrow.parquet as pq

    ids: list[str] = []
    for path in paths:
        ids.extend(pq.read_table(path, columns=["id"], filesystem=storage.fs).column("id").to_pylist())
    return ids


def read_rows(storage: Storage, paths: Sequence[str], start: int, stop: int) -> list[Record]:
    """Records ``[start, stop)`` of a split in ``read_shards`` order; only the shards holding them
    are read (a Train worker evaluating its slice need not fetch the whole split)."""
    import pyarrow.parquet as pq

    out: list[Record] = []
    offset = 0
    for path in paths:
        if offset >= stop:
            break
        n = pq.read_metadata(path, filesystem=storage.fs).num_rows
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            table = pq.read_table(path, filesystem=storage.fs).slice(lo - offset, hi - lo)
            out.extend(Record.from_row(row) for row in table.to_pylist())
        offset += n
    return out


def positions_of(ids: Sequence[str], where: str) -> dict[str, int]:
    """``id -> position``; ids must be unique within a split to locate rows in a distributed read."""
    pos = {rid: i for i, rid in enumerate(ids)}
    if len(pos) != len(ids):
        seen: set[str] = set()
        dup = next(r for r in ids if r in seen or seen.add(r))
        raise DataError(f"{where}: record id {dup!r} appears twice (ids must be unique within a task's split)")
    return pos


# -- the batch order -------------------------------------------------------------------------
def epoch_order(seed: int, task: int, epoch: int, n: int, batch_size: int, salt: str) -> np.ndarray:
    """Sample positions of one training epoch, full batches only: THE batch order of a task.

    ``stages.train_stream`` (in-process) and :class:`StreamPlan` (Ray Data) must draw the same
    order for the two executors to agree; both should call this (it needs no torch, so the Ray
    Data tasks that plan rows stay light).
    """
    rng = np.random.default_rng([seed, task, epoch, zlib.crc32(salt.encode())])  # probe and train differ
    return rng.permutation(n)[: n - n % batch_size]


@dataclass(frozen=True)
class Phase:
    name: str  # "probe" | "train"
    steps: int  # optimizer steps of the phase
    salt: str  # the salt stages.train_stream was given for this phase
    shared: bool = False  # every rank receives the whole global batch (the probe observes all of it)


@dataclass
class StreamPlan:
    """The sequence of training samples of one task's fused run, as the in-process stages draw it."""

    n: int  # records in the split
    batch_size: int  # global batch (train.batch_size capped at n, as train_stream does)
    world_size: int  # the most workers the run may have (train.max_workers)
    seed: int
    task: int
    phases: list[Phase] = field(default_factory=list)
    mode: str = "exact"  # train.ingest
    shuffle_buffer: int = 0  # stream mode: rows a rank shuffles at a time (0: the rank's whole share)

    def __post_init__(self) -> None:
        self.phases = [p if isinstance(p, Phase) else Phase(**p) for p in self.phases]
        if self.batch_size % self.world_size:
            raise DataError(
                f"task {self.task}: a batch of {self.batch_size} samples does not split over {self.world_size} workers"
            )

    @classmethod
    def build(cls, *, n: int, batch_size: int, world_size: int, seed: int, task: int,
              phases: Sequence[Phase], mode: str = "exact", shuffle_buffer: int = 0) -> "StreamPlan":
        if n < 1:
            raise DataError(f"task {task}: the training split is empty")
        return cls(n, min(batch_size, n), world_size, seed, task, list(phases), mode, shuffle_buffer)

    def micro(self, world_size: int) -> int:
        """Samples per rank per step on ``world_size`` workers."""
        if self.batch_size % world_size:
            raise DataError(f"task {self.task}: a batch of {self.batch_size} samples does not split over "
                            f"{world_size} workers")
        return self.batch_size // world_size

    @property
    def per_epoch(self) -> int:
        return self.n - self.n % self.batch_size  # full batches only

    def epoch_order(self, epoch: int, salt: str) -> np.ndarray:
        """Positions of epoch ``epoch``'s samples, in stream order (= stages.train_stream)."""
        return epoch_order(self.seed, self.task, epoch, self.n, self.batch_size, salt)

    def rows_of(self, phase: int) -> int:
        return self.phases[phase].steps * self.batch_size

    @property
    def total_rows(self) -> int:
        return sum(self.rows_of(k) for k in range(len(self.phases)))

    def offset(self, phase: int) -> int:
        return sum(self.rows_of(i) for i in range(phase))

    # -- stream mode -----------------------------------------------------------------------
    def batches_per_epoch(self, world_size: int) -> int:
        """Micro-batches every rank draws per epoch on ``world_size`` workers: ``streaming_split(equal=True)``
        gives each rank ``n // W`` rows; full micro-batches only (``W * micro <= n``, so at least one)."""
        return (self.n // world_size) // self.micro(world_size)

    def step_index(self, phase: int, step: int) -> int:
        """Place of ``(phase, step)`` in the fused run's sequence of steps."""
        return self.offset(phase) // self.batch_size + step

    def shuffle_seed(self, epoch: int, rank: int) -> int:
        return zlib.crc32(json.dumps([self.seed, self.task, epoch, rank]).encode())

    def shuffle_rows(self) -> int:
        per_rank = self.n // self.world_size
        return min(per_rank, self.shuffle_buffer) if self.shuffle_buffer else per_rank

    def assignments(self) -> tuple[np.ndarray, np.ndarray]:
        """(position, seq) of every planned sample, ``seq`` = place in the fused run's stream."""
        pos_parts, seq_parts = [], []
        for k, phase in enumerate(self.phases):
            rows = self.rows_of(k)
            epochs = math.ceil(rows / self.per_epoch) if rows else 0
            order = np.concatenate([self.epoch_order(e, phase.salt) for e in range(epochs)])[:rows] if epochs else \
                np.zeros(0, dtype=np.int64)
            pos_parts.append(order.astype(np.int64))
            seq_parts.append(self.offset(k) + np.arange(rows, dtype=np.int64))
        if not pos_parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(pos_parts), np.concatenate(seq_parts)

    def columns_for(self, seq: np.ndarray) -> dict[str, np.ndarray]:
        """The plan columns of samples ``seq``: phase index, step within the phase, place in the step's batch."""
        bounds = np.cumsum([self.rows_of(k) for k in range(len(self.phases))])
        phase = np.searchsorted(bounds, seq, side="right")
        within = seq - np.concatenate([[0], bounds])[phase]
        shared = np.array([p.shared for p in self.phases] + [False], dtype=np.int64)
        return {
            "seq": seq, "phase": phase.astype(np.int64), "step": within // self.batch_size,
            "slot": within % self.batch_size, "shared": shared[phase],
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "StreamPlan":
        return cls(**raw)


def expand_rows(table: pa.Table, plan_json: dict[str, Any], positions: dict[str, int]) -> pa.Table:
    """Ray Data flat-map: every record becomes one row per place it takes in the planned stream."""
    plan = StreamPlan.from_json(plan_json)
    pos, seq = _plan_index(json.dumps(plan_json, sort_keys=True))
    ids = table.column("id").to_pylist()
    take, seqs = [], []
    for row, rid in enumerate(ids):
        p = positions[rid]
        lo, hi = np.searchsorted(pos, p, side="left"), np.searchsorted(pos, p, side="right")
        for s in seq[lo:hi]:
            take.append(row)
            seqs.append(s)
    out = table.take(pa.array(take, type=pa.int64()))
    cols = plan.columns_for(np.asarray(seqs, dtype=np.int64))
    for name in PLAN_COLUMNS:
        out = out.append_column(name, pa.array(cols[name], type=pa.int64()))
    return out


@lru_cache(maxsize=4)
def _plan_index(plan_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(positions sorted, their seq) of a plan: each map task builds it once."""
    pos, seq = StreamPlan.from_json(json.loads(plan_key)).assignments()
    order = np.argsort(pos, kind="stable")
    return pos[order], seq[order]


def select_rank(table: pa.Table, rank: int, micro: int) -> pa.Table:
    """Ray Data filter: the rows of one data-parallel rank (its ``micro`` slots, plus every shared row)."""
    import pyarrow.compute as pc

    slot = table.column("slot")
    mine = pc.and_(pc.greater_equal(slot, rank * micro), pc.less(slot, (rank + 1) * micro))
    return table.filter(pc.or_(mine, pc.equal(table.column("shared"), 1)))


# -- decode + tokenise (map_batches) and padding (worker) ---------------------------------------
@lru_cache(maxsize=2)
def processor_from(source: str) -> Any:
    """The VLM processor a Ray Data task needs, built once per process.

    ``source`` is JSON: ``{"settings": ...}`` (the compact processor's own JSON, cheap) or
    ``{"ctx": ...}`` (a checkpoint's processor: the stage runtime is built in this process).
    """
    raw = json.loads(source)
    if raw.get("settings") is not None:
        from cram_ray.models.vlm import compact_processor_from_settings

        return compact_processor_from_settings(raw["settings"])
    from cram_ray.pipeline.context import StageContext, runtime

    return runtime(StageContext.from_json(raw["ctx"])).vlm.processor


def records_of(batch: dict[str, np.ndarray]) -> list[Record]:
    n = len(batch["id"])
    answers = batch.get("answers")
    return [Record(str(batch["id"][i]), str(batch["task"][i]), _bytes_or_none(batch["image"][i]),
                   str(batch["instruction"][i]), str(batch["answer"][i]), str(batch["metric"][i]),
                   None if answers is None else _strings_or_none(answers[i])) for i in range(n)]


def _missing(value: Any) -> bool:
    """A null cell as Ray Data's numpy batches give it: None, or a NaN of any float width (an
    all-null column arrives as float32 NaNs)."""
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _strings_or_none(value: Any) -> Optional[tuple[str, ...]]:
    if _missing(value) or len(value) == 0:
        return None
    return tuple(str(a) for a in value)


def _bytes_or_none(value: Any) -> Optional[bytes]:
    if _missing(value):
        return None
    return bytes(value)


def encode_rows(batch: dict[str, np.ndarray], source: str, task: Union[int, dict[str, int]]) -> dict[str, np.ndarray]:
    """Ray Data map_batches: records -> unpadded token ids + pixels (one row per sample).
    ``task``: the rows' task index, or each task name's index when rows of several tasks are read
    together."""
    processor = processor_from(source)
    recs = records_of(batch)
    index = np.array([task[r.task] for r in recs], dtype=np.int64) if isinstance(task, dict) \
        else np.full(len(recs), task, dtype=np.int64)
    encoded = [processor.encode(r, with_answer=True) for r in recs]
    out = {k: batch[k] for k in PLAN_COLUMNS if k in batch}
    out.update({
        "prompt_ids": _ragged([e.prompt for e in encoded]),
        "target_ids": _ragged([e.target for e in encoded]),
        "pixel_values": processor.pixel_values([r.image for r in recs]).float().numpy(),  # bf16 has no numpy type
        "task_index": index,
        "has_image": np.array([r.image is not None for r in recs], dtype=bool),
        "instruction": np.array([r.instruction for r in recs], dtype=object),
    })
    return out


def _ragged(rows: list[list[int]]) -> np.ndarray:
    out = np.empty(len(rows), dtype=object)
    for i, r in enumerate(rows):
        out[i] = np.asarray(r, dtype=np.int64)
    return out


def collate_train(batch: dict[str, np.ndarray], *, pad_id: int, pixel_dtype: Any = None,
                  ignore_index: int = -100) -> dict[str, Any]:
    """Encoded rows -> the batch ``VLMProcessor.train_batch`` builds (right padding, answer labels)."""
    import torch  # here, not at import: the plan's read/expand/sort tasks never load torch

    pixel_dtype = pixel_dtype or torch.float32
    prompts = [np.asarray(p, dtype=np.int64) for p in batch["prompt_ids"]]
    targets = [np.asarray(t, dtype=np.int64) for t in batch["target_ids"]]
    n = len(prompts)
    length = max(len(p) + len(t) for p, t in zip(prompts, targets))
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), ignore_index, dtype=torch.long)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        seq = torch.from_numpy(np.concatenate([p, t]))
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
        labels[i, len(p): len(seq)] = torch.from_numpy(t)
    return {
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "pixel_values": torch.from_numpy(np.ascontiguousarray(np.stack(list(batch["pixel_values"])))).to(pixel_dtype),
        "task_index": torch.tensor(np.asarray(batch["task_index"], dtype=np.int64)),
        "has_image": torch.tensor(np.asarray(batch["has_image"], dtype=bool)),
        "instruction": [str(s) for s in batch["instruction"]],
    }


def merge_collated(parts: Sequence[dict[str, Any]], *, pad_id: int, ignore_index: int = -100) -> dict[str, Any]:
    """Collated micro-batches -> the collated batch of all their rows (what :func:`collate_train`
    makes of the concatenated rows): token columns re-padded on the right to the longest sample."""
    import torch

    if len(parts) == 1:
        return parts[0]
    length = max(p["input_ids"].shape[1] for p in parts)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": ignore_index}
    out: dict[str, Any] = {}
    for key, value in fill.items():
        out[key] = torch.cat([torch.nn.functional.pad(p[key], (0, length - p[key].shape[1]), value=value)
                              for p in parts])
    for key in ("pixel_values", "task_index", "has_image"):
        out[key] = torch.cat([p[key] for p in parts])
    out["instruction"] = [s for p in parts for s in p["instruction"]]
    return out


def _collate_class():
    """A Ray ``NumpyBatchCollateFn`` running :func:`collate_train` in Ray Data's formatting threads."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class TrainCollate(NumpyBatchCollateFn):
        def __init__(self, pad_id: int, pixel_dtype: Any) -> None:
            self.pad_id, self.pixel_dtype = pad_id, pixel_dtype

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return collate_train(batch, pad_id=self.pad_id, pixel_dtype=self.pixel_dtype)

    return TrainCollate


class ShardStream:
    """A rank's collated micro-batches of the stream ingest, addressed by ``(phase, step)``.

    ``take`` returns a list of batches in rank order: this rank's only, or, in a shared phase,
    every rank's (gathered from the other ranks: a collective, called by every rank at every step).
    """

    def __init__(self, shard: Any, plan: StreamPlan, rank: int, *, pad_id: int, pixel_dtype: Any,
                 prefetch: int = 4, world_size: Optional[int] = None) -> None:
        self.shard, self.plan, self.rank = shard, plan, rank
        self.world_size = world_size or plan.world_size  # the group's size: fewer than planned after an elastic restart
        self.collate = _collate_class()(pad_id, pixel_dtype)
        self.pad_id, self.prefetch = pad_id, prefetch
        self.epoch: Optional[int] = None
        self.position = 0  # batches of the current epoch drawn so far
        self._batches: Any = None

    def _start(self, epoch: int) -> None:
        if self._batches is not None:
            for _ in self._batches:  # the split's epochs run in lockstep: finish this one first
                pass
        self._batches = iter(self.shard.iter_torch_batches(
            batch_size=self.plan.micro(self.world_size), drop_last=True, prefetch_batches=self.prefetch, device="cpu",
            collate_fn=self.collate, local_shuffle_buffer_size=self.plan.shuffle_rows(),
            local_shuffle_seed=self.plan.shuffle_seed(epoch, self.rank)))
        self.epoch, self.position = epoch, 0

    def take(self, phase: int, step: int) -> list[dict[str, Any]]:
        epoch, index = divmod(self.plan.step_index(phase, step), self.plan.batches_per_epoch(self.world_size))
        if self.epoch != epoch or self.position > index:
            self._start(epoch)
        try:
            while self.position < index:  # a resumed fit skips what its earlier attempt trained on
                next(self._batches)
                self.position += 1
            mine = next(self._batches)
        except StopIteration:
            raise RuntimeError(f"rank {self.rank}: epoch {epoch} of the training data ended after "
                               f"{self.position} of {self.plan.batches_per_epoch(self.world_size)} batches") from None
        self.position += 1
        if not self.plan.phases[phase].shared:
            return [mine]
        import torch.distributed as dist

        parts: list[Any] = [None] * self.plan.world_size
        dist.all_gather_object(parts, mine)
        return parts
