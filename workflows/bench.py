"""Micro-benchmarks of cram_ray's building blocks: ``python workflows/bench.py <subcommand>``.

Subcommands:
  rank   time CRAM's adaptive-rank allocation over the target linears of a 7B-sized model
  base   does the tiny base read its images? held-out exact match per question, beside the same
         questions asked with the images shuffled between records
  probe  how much of each built-in task's answer a linear classifier reads from the base's
         projected image tokens (test accuracy of a logistic regression per task)
  ingest training samples/s fed by Ray Data to a Ray Train worker vs a plain torch DataLoader loop,
         same model, data and batch size, in one run; last line ``ratio X`` (Ray / plain)
  eval   evaluation samples/s, Ray Data batch inference on an actor pool vs the in-process loop,
         in one run; last line ``ratio X`` (Ray / in-process)
  prepare  workflows/prepare_data.py on a generated LLaVA-JSON benchmark of N 96x96 JPEG records:
         records per second and the preparing process's peak RSS (several sizes: its growth)
  omp    training seconds of a short tiny-cpu stream with torch's OpenMP threads sleeping at once
         (PASSIVE), spinning a while (cram_ray's default) or spinning (ACTIVE) at barriers, alternated
         in one run, optionally beside busy processes; ``ratio <variant> / PASSIVE: X`` lines
  install  a fresh venv per variant installing the package as ``make`` does: pip compiling every
         module's bytecode; ``--no-compile``; and ``--no-compile`` then ``cram_ray.precompile``
         (what the Makefile does); each followed by two imports of the modules a Ray stream's
         processes load, in this shell's environment (with ``PYTHONDONTWRITEBYTECODE`` set, every
         process compiles what has no bytecode); ``ratio <variant> / compile: X`` lines
  step   the tiny-cpu training step (CRAM, shipped base, in process), its variants alternated in one
         run on the same batches: the model's own loss (logits at every position) with a separate
         routing pass of the vision tower; logits at the answer positions only; and that with the
         routing pass shared with the forward (the project's step); last line ``ratio X`` (now / before)
  stream a whole stream on Ray over a generated JPEG benchmark of N records (smoke model, a few steps
         per task): the driver's peak RSS while it prepares the shards, trains, aggregates and
         evaluates, and the stream's wall time
  serve  the Serve app of workflows/serve.py on one replica under N closed-loop HTTP clients:
         p50 / p99 latency and requests/s with dynamic batching and without, in one run; last line
         ``ratio X`` (batched / unbatched requests/s)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cram_ray import OMP_ENV, SPIN_COUNT  # first: cram_ray sets how torch's OpenMP threads wait
from cram_ray.cli import fail_cleanly
from cram_ray.precompile import STREAM_IMPORTS

import torch

from cram_ray.methods.cram.rank import allocate

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "workflows" / "configs"


def bench_rank(args: argparse.Namespace) -> None:
    """Time ``allocate`` per layer on random buffers (data generation excluded)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    d = args.dim
    ranks: list[int] = []
    seconds = 0.0
    for _ in range(args.layers):
        A = torch.randn(args.buf_rank, d, generator=g) / d ** 0.5  # (r, d_in)
        B = torch.randn(d, args.buf_rank, generator=g) * 0.05  # (d_out, r)
        hist = [torch.randn(args.hist_rank, d, generator=g) / d ** 0.5 for _ in range(args.hist)]
        t0 = time.perf_counter()
        A_new, _ = allocate(A, B, 1.0, hist, args.tau_alloc, args.tau_novel, args.rank_min, args.rank_max)
        seconds += time.perf_counter() - t0
        ranks.append(A_new.shape[0])
    print(
        f"rank allocation: {args.layers} layers of {d}x{d}, buffer rank {args.buf_rank}, "
        f"{args.hist} historical experts of rank {args.hist_rank}, {torch.get_num_threads()} threads"
    )
    print(f"total {seconds:.3f} s, per layer {1000 * seconds / args.layers:.2f} ms")
    print(f"ranks: min {min(ranks)}, max {max(ranks)}, sum {sum(ranks)}")


def tiny_base(args: argparse.Namespace, command: str):
    """(config, the tiny base of ``args.config``: shipped, cached or trained now)."""
    from cram_ray.config import load_config
    from cram_ray.models.base import get_base_vlm

    cfg = load_config(args.config, args.overrides)
    if cfg.model.kind != "tiny" or cfg.data.benchmark:
        raise SystemExit(f"error: bench.py {command}: expected the tiny model on the built-in benchmark")
    return cfg, get_base_vlm(cfg)


def bench_base(args: argparse.Namespace) -> None:
    """Greedy exact match of the tiny base on held-out mix records, per question, with the true
    images and with the images shuffled between records. With ``--retrain NAME`` the preset's base
    is pretrained anew, shipped (16-bit) into ``--out``/NAME, and both precisions are measured."""
    if args.retrain:
        from cram_ray.config import load_config
        from cram_ray.models.base import load_shipped, retrain

        cfg = load_config(str(CONFIGS / f"{args.retrain}.yaml"), args.overrides)
        out = Path(args.out) / args.retrain
        full = retrain(cfg, out)
        shipped = load_shipped(out, cfg)
        shipped.meta["base_dir"] = str(out)
        for vlm, label in ((full, "float32, as trained"), (shipped, "shipped float16")):
            heldout_table(cfg, vlm, args.records, label)
        return
    cfg, vlm = tiny_base(args, "base")
    heldout_table(cfg, vlm, args.records, vlm.meta.get("source", ""))


def heldout_table(cfg, vlm, n_records: int, label: str) -> None:
    import collections
    import dataclasses

    import numpy as np

    from cram_ray.data.pretrain_mix import pretrain_records
    from cram_ray.models.base import HELDOUT_SEED_OFFSET, greedy_answers

    torch.manual_seed(0)
    records = pretrain_records(n_records, cfg.model.image_size, cfg.model.base.seed + HELDOUT_SEED_OFFSET)
    perm = np.random.default_rng(0).permutation(len(records))
    shuffled = [dataclasses.replace(r, image=records[j].image) for r, j in zip(records, perm)]

    real = greedy_answers(vlm, records, cfg.data.max_answer_len)
    fake = greedy_answers(vlm, shuffled, cfg.data.max_answer_len)
    table: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    for r, a, b in zip(records, real, fake):
        row = table[r.instruction]
        row[0] += 1
        row[1] += a == r.answer.strip()
        row[2] += b == r.answer.strip()
    n = len(records)
    print(f"base {vlm.meta.get('base_dir')} ({label}): {vlm.meta.get('steps')} steps, "
          f"{vlm.meta.get('train_seconds')} s training, vision warm-up accuracy {vlm.meta.get('vision_warmup_accuracy')}")
    print(f"{'question':44s} {'n':>4s} {'exact %':>8s} {'shuffled %':>10s}")
    for q, (c, hit, hit_shuffled) in sorted(table.items(), key=lambda kv: -kv[1][0]):
        print(f"{q[:44]:44s} {c:4d} {100 * hit / c:8.1f} {100 * hit_shuffled / c:10.1f}")
    print(f"{'all':44s} {n:4d} {100 * sum(v[1] for v in table.values()) / n:8.1f} "
          f"{100 * sum(v[2] for v in table.values()) / n:10.1f}")
    print(f"answers that change when the images are shuffled: {100 * sum(a != b for a, b in zip(real, fake)) / n:.1f}%")
    transfer = stream_canvas_records(cfg, n_records // 4)
    answers = greedy_answers(vlm, [r for _, r in transfer], cfg.data.max_answer_len)
    per_task: dict[str, tuple[list[bool], set[str]]] = collections.defaultdict(lambda: ([], set()))
    for (task, r), a in zip(transfer, answers):
        per_task[task][0].append(a == r.answer)
        per_task[task][1].add(r.instruction)
    print("zero-shot on the stream's test images, asked the mix's own question:")
    print(f"{'task':14s} {'question':38s} {'n':>4s} {'exact %':>8s}")
    for task, (hits, asked) in per_task.items():
        label = next(iter(asked)) if len(asked) == 1 else f"one of {len(asked)} questions"
        print(f"{task:14s} {label[:38]:38s} {len(hits):4d} {100 * sum(hits) / len(hits):8.1f}")


def stream_canvas_records(cfg, n: int) -> list[tuple[str, "Record"]]:
    """(task, record): the built-in tasks' test images with the mix question and answer that mean
    the same thing -- does the base's reading carry over to the tasks' canvases before any tuning?"""
    from cram_ray.data import builtin as B
    from cram_ray.data import pretrain_mix as M
    from cram_ray.data.draw import png_bytes
    from cram_ray.data.records import Record

    as_mix = {
        "choice": lambda q, a: (M.Q_WHERE, B.CHOICE_PANELS[B.CHOICE_LETTERS.index(a)]),
        "ocr": lambda q, a: (M.Q_TEXT, a),
        "classify": lambda q, a: (M.Q_DIGIT, str(B.NUMBER_WORDS.index(a))),
        "compose": lambda q, a: (M.Q_COLOUR, a.split()[0]),  # "red circle": its colour half
        "unanswerable": lambda q, a: None if a == B.UNANSWERABLE else (M.Q_COLOUR, a),
        "count": lambda q, a: (M.Q_COUNT, a),
    }
    out = []
    for task, convert in as_mix.items():
        for i in range(n):
            img, question, answer = B.make_example(task, "test", i, cfg.data.builtin.image_size, "distinct", cfg.data.builtin.seed)
            pair = convert(question, answer)
            if pair is not None:
                out.append((task, Record(f"{task}-{i}", task, png_bytes(img), pair[0], pair[1], "exact")))
    return out


def bench_probe(args: argparse.Namespace) -> None:
    """Logistic regression from the frozen base's projected image tokens to each task's answer."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from cram_ray.data.builtin import generate_builtin
    from cram_ray.data.manifest import load_benchmark
    from cram_ray.models.vision_warmup import patch_tokens

    cfg, vlm = tiny_base(args, "probe")
    bench = load_benchmark(generate_builtin(cfg.data.builtin, Path(cfg.data.cache_dir).expanduser() / "builtin"))
    wanted = [t for t in args.tasks.split(",") if t] or [t.name for t in bench.tasks]

    def features(records):
        parts = []
        for i in range(0, len(records), 100):
            pixels = vlm.processor.pixel_values([r.image for r in records[i:i + 100]])
            with torch.no_grad():
                parts.append(vlm.model.model.multi_modal_projector(patch_tokens(vlm.model, pixels)).flatten(1))
        return torch.cat(parts).float().numpy()

    print(f"{'task':14s} {'classes':>7s} {'train':>6s} {'test':>5s} {'probe acc %':>11s} {'majority %':>10s}")
    for task in bench.tasks:
        if task.name not in wanted:
            continue
        train, test = task.records("train"), task.records("test")
        x_tr, x_te = features(train), features(test)
        mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
        classes = sorted({r.answer for r in train})
        clf = LogisticRegression(max_iter=300, C=0.1).fit((x_tr - mu) / sd, [r.answer for r in train])
        acc = float(np.mean(clf.predict((x_te - mu) / sd) == np.array([r.answer for r in test])))
        majority = max(sum(r.answer == c for r in test) for c in classes) / len(test)
        print(f"{task.name:14s} {len(classes):7d} {len(train):6d} {len(test):5d} {100 * acc:11.1f} {100 * majority:10.1f}")


def bench_context(args: argparse.Namespace, storage: Path):
    """A one-task run of ``args.config`` with ``args.records`` records per split, prepared under ``storage``."""
    from cram_ray.config import load_config
    from cram_ray.pipeline.context import StageContext
    from cram_ray.pipeline.driver import prepare_data

    n = args.records
    cfg = load_config(args.config, [f"storage={storage}", "tracking.enabled=false", "train.executor=ray",
                                    f"data.builtin.tasks=[{args.task}]", f"data.builtin.train_per_task={n}",
                                    f"data.builtin.test_per_task={n}", *args.overrides])
    return StageContext(cfg, "bench", prepare_data(cfg, "bench"))


def machine(threads: int) -> str:
    import os

    return f"machine: {os.cpu_count()} cores, torch {threads} intra-op thread(s) per training process"


def _ingest_model(settings: dict, cfg_json: dict):
    """The same randomly initialised tiny VLM in every process (throughput does not depend on weights)."""
    from cram_ray.config import from_dict
    from cram_ray.models.vlm import build_tiny_llava, compact_processor_from_settings

    processor = compact_processor_from_settings(settings)
    torch.manual_seed(0)
    model = build_tiny_llava(from_dict(cfg_json).model, processor.text)
    return model, processor, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def _train_step(model, optimizer, batch) -> None:
    from cram_ray.models.vlm import model_inputs

    loss = model(**model_inputs(batch)).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _ingest_worker(config: dict) -> None:
    """Ray Train worker of ``bench.py ingest``: the fused run's data path (ShardStream) into plain steps."""
    import json
    import tempfile

    import ray.train

    from cram_ray.train.ingest import ShardStream, StreamPlan

    model, processor, optimizer = _ingest_model(config["settings"], config["cfg"])
    plan = StreamPlan.from_json(config["plan"])
    stream = ShardStream(ray.train.get_dataset_shard("train"), plan, ray.train.get_context().get_world_rank(),
                         pad_id=processor.text.pad_id, pixel_dtype=torch.float32)
    t0 = time.perf_counter()
    for step in range(plan.phases[0].steps):
        if step == config["warmup"]:
            t_timed = time.perf_counter()
        (batch,) = stream.take(0, step)
        _train_step(model, optimizer, batch)
    end = time.perf_counter()
    metrics = {"timed_seconds": end - t_timed, "first_seconds": t_timed - t0, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:  # Train v2 keeps the metrics of a report with a checkpoint
        (Path(tmp) / "bench.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _plain_loop(args: argparse.Namespace, ctx, settings: dict, processor, records, bs: int) -> tuple[float, float]:
    """(warm-up seconds, timed seconds) of the same steps fed by a torch DataLoader in this process."""
    model, _, optimizer = _ingest_model(settings, ctx.cfg.to_dict())
    loader = torch.utils.data.DataLoader(
        records, batch_size=bs, shuffle=True, drop_last=True, num_workers=args.loader_workers,
        generator=torch.Generator().manual_seed(ctx.cfg.train.seed), persistent_workers=args.loader_workers > 0,
        collate_fn=lambda recs: processor.train_batch(recs, [0] * len(recs)))
    t0 = time.perf_counter()
    done = 0
    while done < args.steps:
        for batch in loader:
            if done == args.warmup:
                t_timed = time.perf_counter()
            _train_step(model, optimizer, batch)
            done += 1
            if done == args.steps:
                break
    return t_timed - t0, time.perf_counter() - t_timed


def bench_ingest(args: argparse.Namespace) -> None:
    """Samples/s of training steps fed by Ray Data (stream ingest into one Train worker) and by a torch
    DataLoader in this process, same model, records and batch size; the first ``--warmup`` steps
    (pipeline and worker start) are timed apart."""
    import json
    import tempfile

    import ray
    from ray.data import ExecutionOptions
    from ray.data.dataset import MaterializedDataset
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cram_ray.data.shards import read_shards
    from cram_ray.models.base import base_tokenizer
    from cram_ray.models.vlm import compact_processor
    from cram_ray.pipeline.ray_cluster import connect
    from cram_ray.train.ingest import Phase, StreamPlan
    from cram_ray.train.trainer import stream_dataset

    with tempfile.TemporaryDirectory(prefix="cram-bench-") as tmp:
        ctx = bench_context(args, Path(tmp))
        train = ctx.cfg.train
        processor = compact_processor(ctx.cfg.model, ctx.cfg.data, base_tokenizer())
        settings = processor.settings()
        source = json.dumps({"settings": settings}, sort_keys=True)
        steps, bs = args.steps, min(train.batch_size, ctx.tasks[0].n_train)
        plan = StreamPlan.build(n=ctx.tasks[0].n_train, batch_size=bs, world_size=1, seed=train.seed, task=0,
                                phases=[Phase("train", steps, "train")], mode="stream",
                                shuffle_buffer=train.shuffle_buffer)

        records = read_shards(ctx.storage.get_dir(ctx.shard_rel(0, "train"), Path(tmp) / "local"))
        threads = max(1, int(train.cpus_per_worker))  # what Ray gives the Train worker (OMP_NUM_THREADS)
        torch.set_num_threads(threads)
        # plain loop before and after the Ray run: a load change on a shared machine hits both sides
        before = _plain_loop(args, ctx, settings, processor, records, bs)

        connect(train)
        t_data = time.perf_counter()
        ds = stream_dataset(ctx, 0, source)  # as the stream does: materialised when small
        data_s = time.perf_counter() - t_data
        trainer = TorchTrainer(
            _ingest_worker,
            train_loop_config={"settings": settings, "cfg": ctx.cfg.to_dict(), "plan": plan.to_json(), "warmup": args.warmup},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": train.cpus_per_worker}),
            run_config=RunConfig(name="bench_ingest", storage_path=str(Path(tmp) / "runs")),
            datasets={"train": ds}, dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        )
        with trainer.fit().checkpoint.as_directory() as saved:
            got = json.loads((Path(saved) / "bench.json").read_text())
        ray.shutdown()
        after = _plain_loop(args, ctx, settings, processor, records, bs)

    timed = (steps - args.warmup) * bs
    ray_sps = timed / got["timed_seconds"]
    plain_sps = 2 * timed / (before[1] + after[1])
    print(f"ingest: {ctx.cfg.model.kind} model of {args.config}, task {args.task}, {ctx.tasks[0].n_train} records, "
          f"batch {bs}, {steps} steps ({args.warmup} warm-up steps timed apart)")
    print(machine(int(got["threads"])) + f" (plain loop: {torch.get_num_threads()})")
    print(f"ray data -> train worker: {ray_sps:.1f} samples/s (before the run: dataset prepared in {data_s:.1f} s, "
          f"materialised: {isinstance(ds, MaterializedDataset)}; warm-up {got['first_seconds']:.1f} s)")
    print(f"plain DataLoader ({args.loader_workers} loader worker(s)), run before and after: {plain_sps:.1f} samples/s "
          f"({timed / before[1]:.1f} and {timed / after[1]:.1f}; warm-up {before[0]:.1f} s)")
    print(f"ratio {ray_sps / plain_sps:.3f}")


def bench_eval(args: argparse.Namespace) -> None:
    """Evaluation samples/s of the base with the method attached (no task trained yet): Ray Data batch
    inference on the stage's actor pool vs the in-process evaluation loop, over the same test records."""
    import tempfile

    import ray

    from cram_ray.pipeline.context import runtime, task_records
    from cram_ray.pipeline.ray_cluster import connect
    from cram_ray.pipeline.ray_data_stages import Evaluator, _pool, split_dataset
    from cram_ray.pipeline.stages import evaluate_task, restore

    with tempfile.TemporaryDirectory(prefix="cram-bench-") as tmp:
        ctx = bench_context(args, Path(tmp))
        n = ctx.tasks[0].n_test
        threads = max(1, int(ctx.cfg.train.cpus_per_worker))  # what each actor gets (OMP_NUM_THREADS)
        torch.set_num_threads(threads)
        rt = runtime(ctx)
        model, method = restore(ctx, 0, "evaluate", rt, Path(tmp))
        records = task_records(ctx, 0, "test", Path(tmp))
        t0 = time.perf_counter()
        evaluate_task(ctx, rt, model, method, 0, records[:ctx.cfg.train.eval_batch_size])  # lazy loads, first calls
        local_warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        local_rows, _ = evaluate_task(ctx, rt, model, method, 0, records)
        before = time.perf_counter() - t0

        connect(ctx.cfg.train)
        t0, wall0 = time.perf_counter(), time.time()
        out = split_dataset(ctx, [(0, "test")]).map_batches(
            Evaluator, fn_constructor_kwargs={"ctx_json": ctx.to_json(), "task": 0, "splits": [0]},
            batch_size=ctx.cfg.train.eval_batch_size, batch_format="numpy", **_pool(ctx, gpu=True))
        rows = list(out.iter_rows())
        ray_s = time.perf_counter() - t0
        ready = min(float(r["ready"]) for r in rows) - wall0
        ray.shutdown()
        # the in-process loop again after the Ray pass: a load change on a shared machine hits both sides
        t0 = time.perf_counter()
        evaluate_task(ctx, rt, model, method, 0, records)
        after = time.perf_counter() - t0
        local_s = (before + after) / 2

    import json

    on_ray = {r["id"]: json.loads(r["row"])["prediction"] for r in rows}
    same = len(rows) == len(on_ray) == n and on_ray == {r["id"]: r["prediction"] for r in local_rows}
    ray_sps, local_sps, steady_sps = n / ray_s, n / local_s, n / max(1e-9, ray_s - ready)
    print(f"eval: {ctx.cfg.model.kind} model of {args.config}, task {args.task}, {n} test records, "
          f"batch {ctx.cfg.train.eval_batch_size}, {ctx.cfg.train.num_workers} actor(s)")
    print(machine(threads) + " (the in-process loop and each actor)")
    print(f"in-process loop, run before and after: {local_sps:.1f} samples/s ({before:.1f} s and {after:.1f} s, "
          f"after a {local_warm:.1f} s warm-up batch)")
    print(f"ray data actor pool: {steady_sps:.1f} samples/s once the first actor was ready; end to end "
          f"{ray_sps:.1f} samples/s ({ray_s:.1f} s, of which {max(0.0, ready):.1f} s starting the pool)")
    print(f"every record answered once, with the in-process loop's answer: {same}")
    print(f"end-to-end ratio {ray_sps / local_sps:.3f} (pool start-up included)")
    print(f"ratio {steady_sps / local_sps:.3f}")

def write_jpeg_benchmark(root: Path, n: int, tasks: int = 4, test_every: int = 10) -> Path:
    """A manifest + LLaVA-JSON benchmark of ``n`` distinct 96x96 noise JPEGs (~26 KB each, quality 95)
    over ``tasks`` tasks, one record in ``test_every`` of each task for test; returns the manifest."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {}
    for i in range(n):
        name = f"{i:07d}.jpg"
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(root / "images" / name, quality=95)
        task, split = f"t{i % tasks}", "test" if (i // tasks) % test_every == test_every - 1 else "train"
        rows.setdefault(f"{task}_{split}.json", []).append({
            "id": f"r{i}", "image": name,
            "conversations": [{"from": "human", "value": f"<image>\nWhat is record {i % 97}?"},
                              {"from": "gpt", "value": str(i % 7)}]})
    for file, records in rows.items():
        (root / file).write_text(json.dumps(records))
    manifest = {"name": f"jpeg-{n}", "image_root": "images", "tasks": [
        {"name": f"t{t}", "train": f"t{t}_train.json", "test": f"t{t}_test.json", "metric": "exact"}
        for t in range(tasks)]}
    (root / "bench.yaml").write_text(json.dumps(manifest))
    return root / "bench.yaml"


def bench_prepare(args: argparse.Namespace) -> None:
    """Run prepare_data.py as its own process per size; its peak RSS is the ru_maxrss ``wait4``
    reports for that child alone (the generator's memory is not counted)."""
    import os
    import subprocess
    import tempfile

    sizes = [int(s) for s in str(args.records).split(",")]
    script = Path(__file__).resolve().parent / "prepare_data.py"
    results = []
    with tempfile.TemporaryDirectory(prefix="cram-bench-prepare-", dir=args.tmp) as tmp:
        for n in sizes:
            root = Path(tmp) / f"bench-{n}"
            manifest = write_jpeg_benchmark(root, n)
            size_mb = sum(p.stat().st_size for p in (root / "images").iterdir()) / 1e6
            cmd = [sys.executable, str(script), str(manifest), "--out", str(Path(tmp) / f"out-{n}"),
                   "--executor", args.executor, "--cache-dir", str(Path(tmp) / "cache")]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - t0
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"error: bench.py prepare: prepare_data.py failed on {n} records: "
                                 f"{proc.stderr.read().strip()}")
            rss = usage.ru_maxrss / 1024  # KiB on Linux
            results.append((n, seconds, rss))
            print(f"{n:8d} records ({size_mb:7.1f} MB of JPEG, {args.executor}): {seconds:6.1f} s, "
                  f"{n / seconds:7.0f} records/s, driver peak RSS {rss:6.0f} MB", flush=True)
    if len(results) > 1:
        (n0, _, r0), (n1, _, r1) = results[0], results[-1]
        print(f"driver peak RSS growth from {n0} to {n1} records: {r1 - r0:+.0f} MB "
              f"({(r1 - r0) / max(n1 - n0, 1) * 1000:.1f} KB per record)")


def stream_command(config: str, out: Path, executor: str, *sets: str) -> list[str]:
    """``stream.py`` as a child process: the bench's own sets, MLflow off."""
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "stream.py"), "--config", config,
           "--executor", executor, "--out", str(out)]
    for item in (*sets, "tracking.enabled=false"):
        cmd += ["--set", item]
    return cmd


def peak_rss_mb(pid: int) -> float:
    """The process's own peak resident set (VmHWM), in MB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def bench_stream(args: argparse.Namespace) -> None:
    """stream.py as a child process on a generated benchmark; the driver's peak RSS is its VmHWM,
    sampled until it exits (the embedded cluster's raylet and workers are other processes)."""
    import json
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cram-bench-stream-", dir=args.tmp) as tmp:
        t0 = time.perf_counter()
        manifest = write_jpeg_benchmark(Path(tmp) / "bench", args.records, args.tasks, args.test_every)
        print(f"generated {args.records} records over {args.tasks} task(s) in {time.perf_counter() - t0:.1f} s",
              flush=True)
        out = Path(tmp) / "out"
        cmd = stream_command(args.config, out, "ray", f"train.steps_per_task={args.steps}",
                             f"data.cache_dir={Path(tmp) / 'cache'}", *args.overrides)
        cmd += ["--benchmark", str(manifest)]
        log = Path(tmp) / "stream.log"
        t0 = time.perf_counter()
        with open(log, "w") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True)
            peak = 0.0
            while proc.poll() is None:
                peak = max(peak, peak_rss_mb(proc.pid))
                time.sleep(0.5)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = log.read_text().strip().splitlines()[-5:]
            raise SystemExit("error: bench.py stream: stream.py failed: " + " | ".join(tail))
        summary = json.loads((out / "summary.json").read_text())
        size_mb = sum(p.stat().st_size for p in (Path(tmp) / "bench" / "images").iterdir()) / 1e6
        print(f"machine: {os.cpu_count()} cores")
        print(f"stream on ray: {args.records} records ({size_mb:.0f} MB of JPEG), {args.tasks} task(s), "
              f"{args.steps} steps per task, {args.config}")
        print(f"wall {seconds:.1f} s (prepare, train, aggregate, evaluate); stage_seconds {summary['stage_seconds']}")
        print(f"accuracy matrix {summary['accuracy_matrix']}")
        print(f"driver peak RSS {peak:.0f} MB")


def bench_step(args: argparse.Namespace) -> None:
    import tempfile

    from cram_ray.config import load_config
    from cram_ray.models.features import add_routing_features
    from cram_ray.models.vlm import model_inputs
    from cram_ray.pipeline import stages
    from cram_ray.pipeline.context import StageContext, runtime, task_records
    from cram_ray.pipeline.driver import prepare_data
    from cram_ray.train.loop import compute_loss

    storage = Path(tempfile.mkdtemp(dir=args.tmp))
    cfg = load_config(args.config, [f"storage={storage}", "tracking.enabled=false", "train.executor=local",
                                    f"data.builtin.tasks=[{args.task}]", *args.overrides])
    ctx = StageContext(cfg, "bench", prepare_data(cfg, "bench"))
    rt = runtime(ctx)
    model, method = stages.restore(ctx, 0, "probe", rt, storage)
    records = task_records(ctx, 0, "train", storage)
    method.begin_task(ctx.info(0))
    method.begin_probe() if method.probe_steps(cfg.train.steps_per_task) else method.begin_train()
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=cfg.train.lr)
    bs = cfg.train.batch_size
    batches = [rt.vlm.processor.train_batch(records[i:i + bs], [0] * bs) for i in range(0, len(records) - bs + 1, bs)]

    def own_loss(batch):  # the model's own labels loss: logits at every position
        method.route(batch, training=True)
        out = model(**model_inputs(batch))
        return out.loss + sum(method.extra_losses(batch, out).values(), torch.zeros(()))

    answer_only = lambda b: compute_loss(model, method, b)[0]  # noqa: E731
    cache = stages.feature_cache(ctx, 0, rt)
    t0 = time.perf_counter()
    for batch in batches:  # the task's first epoch: the timed steps are those of every later epoch
        add_routing_features(dict(batch), method.needs_features, rt.image_encoder, rt.text_encoder, for_model=True,
                             cache=cache)
    fill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for batch in batches:  # the same epoch's features without the cache: one batched pass per step
        add_routing_features(dict(batch), method.needs_features, rt.image_encoder, rt.text_encoder, for_model=True)
    batched = time.perf_counter() - t0
    cache.hits = cache.misses = 0
    variants = {"model's own loss, separate routing pass": (own_loss, False, None),
                "answer-only logits, separate routing pass": (answer_only, False, None),
                "answer-only logits, shared routing pass": (answer_only, True, None),
                "answer-only logits, shared pass, feature cache": (answer_only, True, cache)}
    seconds = dict.fromkeys(variants, 0.0)
    model.train()
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, (loss_of, shared, cached) in variants.items():
            t0 = time.perf_counter()
            for i in range(args.steps):
                batch = dict(batches[(r * args.steps + i) % len(batches)])
                add_routing_features(batch, method.needs_features, rt.image_encoder, rt.text_encoder, for_model=shared,
                                     cache=cached)
                optimizer.zero_grad(set_to_none=True)
                loss_of(batch).backward()
                optimizer.step()
            if r:
                seconds[name] += time.perf_counter() - t0
    print(machine(torch.get_num_threads()))
    print(f"tiny-cpu step, method {cfg.method.name}, task {args.task}, batch {bs}, {args.rounds} x {args.steps} steps per variant")
    n = args.rounds * args.steps
    for name, sec in seconds.items():
        print(f"{name:45s} {1000 * sec / n:7.1f} ms/step")
    print(f"first epoch's features ({len(batches)} batches): {fill:.2f} s filling the cache one image per pass, "
          f"{batched:.2f} s in batched passes")
    times = list(seconds.values())
    print(f"ratio shared pass / own loss {times[2] / times[0]:.2f}, feature cache / shared pass {times[3] / times[2]:.2f} "
          f"({100 * cache.hit_rate:.0f}% of images from the cache)")


def omp_policies(names: str, spin: str) -> dict[str, dict[str, str]]:
    """``PASSIVE,spin,spin=3000,ACTIVE`` -> each variant's OpenMP environment (the others' variables
    unset); ``spin`` spins ``spin`` iterations (GOMP_SPINCOUNT), ``spin=N`` N iterations."""
    out = {}
    for name in (n.strip() for n in names.split(",") if n.strip()):
        kind, _, count = name.partition("=")
        if kind in ("PASSIVE", "ACTIVE") and not count:
            out[kind] = {"OMP_WAIT_POLICY": kind}
        elif kind == "spin" and (count or spin).isdigit():
            out[f"spin {count or spin}"] = {"GOMP_SPINCOUNT": count or spin}
        else:
            raise SystemExit(f"error: bench.py omp: --policies: unknown policy {name!r} "
                             "(expected PASSIVE, ACTIVE, spin or spin=<iterations>)")
    return out


def bench_omp(args: argparse.Namespace) -> None:
    """The same short stream (one task, ``--steps`` LoRA-FT steps) in child processes that differ
    only in how torch's OpenMP threads wait at a barrier, alternated so all see the same background
    load; ``--load N`` adds N busy processes for the whole measurement (an oversubscribed machine)."""
    import json
    import os
    import subprocess
    import tempfile

    variants = omp_policies(args.policies, args.spin)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        with tempfile.TemporaryDirectory(prefix="cram-bench-omp-", dir=args.tmp) as tmp:
            for round_ in range(args.rounds):
                for name, omp_env in variants.items():
                    out = Path(tmp) / f"{name.replace(' ', '-')}-{round_}"
                    cmd = stream_command(args.config, out, args.executor, "method.name=lora_ft",
                                         f"data.builtin.tasks=[{args.task}]", f"train.steps_per_task={args.steps}")
                    env = {k: v for k, v in os.environ.items() if k not in OMP_ENV}
                    proc = subprocess.run(cmd, env={**env, **omp_env}, capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise SystemExit(f"error: bench.py omp: stream.py failed: {proc.stderr.strip().splitlines()[-1:]}")
                    train = json.loads((out / "summary.json").read_text())["stage_seconds"]["train"]
                    seconds[name].append(train)
                    print(f"round {round_ + 1} {name:12s}: train stage {train:7.2f} s for {args.steps} steps "
                          f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    mean = {name: sum(v) / len(v) for name, v in seconds.items()}
    print(f"machine: {os.cpu_count()} cores, {args.load} busy processes beside; {args.config}, task {args.task}, "
          f"executor {args.executor}")
    print("mean train stage: " + ", ".join(f"{name} {sec:.2f} s" for name, sec in mean.items()))
    first = list(mean)[0]
    for name in list(mean)[1:]:
        print(f"ratio {name} / {first}: {mean[name] / mean[first]:.3f}")


def install_command(venv: Path, spec: list[str], constraints: str, compile_: bool, pip_args: list[str]) -> list[str]:
    """pip install of ``spec`` into ``venv``, with or without compiling bytecode."""
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *pip_args]
    if not compile_:
        cmd.append("--no-compile")
    if constraints:
        cmd += ["-c", constraints]
    return cmd + spec


def count_bytecode(venv: Path) -> int:
    return sum(1 for _ in venv.rglob("*.pyc"))


def bench_install(args: argparse.Namespace) -> None:
    """Install time with pip compiling every module, with no compilation, and with no compilation
    followed by ``cram_ray.precompile`` (counted in the install), each plus what the next two
    processes importing a stream's modules pay: fresh venvs with pip upgraded first (untimed), as
    ``make`` does; variants alternated over ``--rounds``."""
    import os
    import shlex
    import shutil
    import subprocess
    import tempfile

    spec = shlex.split(args.spec) if args.spec else ["-e", f"{ROOT}[dev]"]
    pip_args = shlex.split(args.pip_args)
    imports = [m.strip() for m in args.imports.split(",") if m.strip()]
    script = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)"
    totals: dict[str, list[float]] = {"compile": [], "no-compile": [], "precompile": []}

    def timed(cmd: list[str], what: str) -> float:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: bench.py install: {what} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="cram-bench-install-", dir=args.tmp) as tmp:
        for round_ in range(args.rounds):
            for name in totals:
                venv = Path(tmp) / f"{name}-{round_}"
                python = str(venv / "bin" / "python")
                timed([args.python, "-m", "venv", str(venv)], "creating the venv")
                if args.upgrade_pip:  # as make does: a recent pip installs faster than the venv's own
                    timed([python, "-m", "pip", "install", "-q", "--upgrade", "pip", *pip_args], "upgrading pip")
                before = count_bytecode(venv)
                install = timed(install_command(venv, spec, args.constraints, name == "compile", pip_args), "pip install")
                if name == "precompile":
                    install += timed([python, str(ROOT / "cram_ray" / "precompile.py"), *imports], "cram_ray.precompile")
                added = count_bytecode(venv) - before
                first = timed([python, "-c", script, *imports], "the first import")
                second = timed([python, "-c", script, *imports], "the second import")
                totals[name].append(install + first)
                print(f"round {round_ + 1} {name:10s}: install {install:6.1f} s ({added:+d} bytecode files), "
                      f"first import {first:5.1f} s, second {second:5.1f} s", flush=True)
                shutil.rmtree(venv, ignore_errors=True)
    mean = {name: sum(v) / len(v) for name, v in totals.items()}
    print(f"machine: {os.cpu_count()} cores; PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}; "
          f"imports: {','.join(imports)}")
    print("mean install + first import: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in mean.items()))
    for name in ("no-compile", "precompile"):
        print(f"ratio {name} / compile: {mean[name] / mean['compile']:.3f}")


def bench_serve(args: argparse.Namespace) -> None:
    """Latency and throughput of the Serve app over HTTP on 127.0.0.1, batched vs one request per
    forward pass, same replica resources and clients (a smoke stream is run first without --run)."""
    import tempfile

    import ray
    from ray import serve

    from cram_ray.pipeline.context import task_records
    from cram_ray.pipeline.ray_cluster import connect
    from cram_ray.serving.app import ServeOptions, deploy
    from cram_ray.serving.load import closed_loop, summary
    from cram_ray.serving.run import find_run, resolve_after_task, run_context

    with tempfile.TemporaryDirectory(prefix="cram-bench-serve-") as tmp:
        run = args.run
        if run is None:
            from cram_ray.config import load_config
            from cram_ray.pipeline.run import run_and_report

            cfg = load_config(str(CONFIGS / "smoke.yaml"),
                              ["train.executor=local", "tracking.enabled=false", f"storage={tmp}", *args.overrides])
            run_and_report(cfg, out=tmp, run_id="bench")
            run = str(Path(tmp) / "bench")
        ref = find_run(run)
        ctx = run_context(ref)
        after = resolve_after_task(ctx, None)
        records = [r for t in range(after + 1) for r in task_records(ctx, t, "test", Path(tmp))]
        how = connect(ctx.cfg.train)
        results = {}
        try:
            for label, batch in (("batched", args.max_batch_size), ("unbatched", 1)):
                options = ServeOptions(port=args.port, max_batch_size=batch, min_replicas=1, max_replicas=1,
                                       cpus_per_replica=args.cpus_per_replica)
                deploy(ref, after, options, use_gpu=ctx.cfg.train.use_gpu, cpus=ctx.cfg.train.cpus_per_worker)
                url = f"http://{options.host}:{options.port}"
                closed_loop(url, records, clients=args.clients, seconds=args.warmup)
                outcomes = closed_loop(url, records, clients=args.clients, seconds=args.seconds)
                results[label] = summary(outcomes, max(o.end for o in outcomes))
                if results[label]["ok"] < results[label]["requests"]:
                    bad = next(o for o in outcomes if o.status != 200)
                    raise SystemExit(f"error: bench.py serve: {results[label]['requests'] - results[label]['ok']} "
                                     f"requests failed ({label}), e.g. status {bad.status}: {str(bad.detail)[:300]}")
        finally:
            serve.shutdown()
            if how == "local":
                ray.shutdown()
    print(f"serve: run {ctx.run_id} ({ctx.cfg.method.name}, {ctx.cfg.model.kind} model) after task {after}, "
          f"{len(records)} distinct test records, 1 replica of {args.cpus_per_replica or ctx.cfg.train.cpus_per_worker} "
          f"CPU, {args.clients} closed-loop clients for {args.seconds:.0f} s (after {args.warmup:.0f} s warm-up)")
    print(machine(torch.get_num_threads()))
    for label, r in results.items():
        print(f"{label:9s} (max batch {args.max_batch_size if label == 'batched' else 1}): p50 {r['p50_ms']:.1f} ms  "
              f"p99 {r['p99_ms']:.1f} ms  {r['rps']:.1f} requests/s  ({r['ok']} of {r['requests']} answered 200)")
    print(f"ratio {results['batched']['rps'] / max(1e-9, results['unbatched']['rps']):.3f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    rank = sub.add_parser("rank", help="time adaptive-rank allocation (SVD via QR, novelty filter)")
    rank.add_argument("--layers", type=int, default=128, help="target linears (LLaVA-7B: 32 blocks x q/k/v/o)")
    rank.add_argument("--dim", type=int, default=4096, help="d_in = d_out of every target linear")
    rank.add_argument("--buf-rank", type=int, default=48, help="probe buffer rank")
    rank.add_argument("--hist", type=int, default=3, help="historical experts in the group")
    rank.add_argument("--hist-rank", type=int, default=8, help="rank of each historical expert")
    rank.add_argument("--tau-alloc", type=float, default=0.08)
    rank.add_argument("--tau-novel", type=float, default=0.99)
    rank.add_argument("--rank-min", type=int, default=4)
    rank.add_argument("--rank-max", type=int, default=10)
    rank.add_argument("--threads", type=int, default=1,
                      help="torch threads; 1 = what a 1-CPU Ray task gets (0 = torch's default)")
    rank.add_argument("--seed", type=int, default=0)
    rank.set_defaults(func=bench_rank)

    base = sub.add_parser("base", help="held-out accuracy of the tiny base with true vs shuffled images")
    base.add_argument("--config", default=str(CONFIGS / "tiny-cpu.yaml"))
    base.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    base.add_argument("--records", type=int, default=400, help="held-out mix records")
    base.add_argument("--retrain", metavar="PRESET", default="",
                      help="pretrain workflows/configs/PRESET.yaml's base anew and ship it into --out/PRESET")
    base.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "cram_ray/assets/bases"),
                      help="where --retrain writes the shipped base (default: the package's assets)")
    base.set_defaults(func=bench_base)

    probe = sub.add_parser("probe", help="linear probes of the base's image tokens on the built-in tasks")
    probe.add_argument("--config", default=str(CONFIGS / "tiny-cpu.yaml"))
    probe.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    probe.add_argument("--tasks", default="", help="comma-separated task names (default: all)")
    probe.set_defaults(func=bench_probe)

    ingest = sub.add_parser("ingest", help="Ray Data -> Train worker vs plain DataLoader training samples/s")
    ingest.add_argument("--loader-workers", type=int, default=1, help="DataLoader worker processes of the plain loop")
    ingest.add_argument("--steps", type=int, default=120)
    ingest.add_argument("--warmup", type=int, default=10, help="first steps, timed apart (start-up)")

    evaluation = sub.add_parser("eval", help="Ray Data batch inference vs in-process evaluation samples/s")
    for p, records in ((ingest, 1024), (evaluation, 256)):
        p.add_argument("--config", default=str(Path(__file__).resolve().parent / "configs/smoke.yaml"))
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--task", default="count", help="built-in task whose records are used")
        p.add_argument("--records", type=int, default=records, help="records per split")
    ingest.set_defaults(func=bench_ingest)
    evaluation.set_defaults(func=bench_eval)
    prep = sub.add_parser("prepare", help="prepare_data.py throughput and driver peak RSS on generated JPEGs")
    prep.add_argument("--records", default="3000", help="records, or comma-separated sizes to compare (3000,12000)")
    prep.add_argument("--executor", choices=["local", "ray"], default="local")
    prep.add_argument("--tmp", default=None, help="folder for the generated benchmark (default: the system's)")
    prep.set_defaults(func=bench_prepare)
    omp = sub.add_parser("omp", help="training time with OpenMP threads sleeping, spinning a while, or spinning at barriers")
    omp.add_argument("--config", default=str(CONFIGS / "tiny-cpu.yaml"))
    omp.add_argument("--task", default="choice")
    omp.add_argument("--steps", type=int, default=30)
    omp.add_argument("--rounds", type=int, default=2)
    omp.add_argument("--policies", default="PASSIVE,spin,ACTIVE",
                     help="comma-separated: PASSIVE (sleep at once), spin (GOMP_SPINCOUNT=--spin), spin=N, ACTIVE (spin)")
    omp.add_argument("--spin", default=SPIN_COUNT, help="the spin variant's GOMP_SPINCOUNT (default: cram_ray's)")
    omp.add_argument("--load", type=int, default=0, help="busy processes running beside the measurement")
    omp.add_argument("--executor", choices=["local", "ray"], default="local")
    omp.add_argument("--tmp", default=None)
    omp.set_defaults(func=bench_omp)
    inst = sub.add_parser("install", help="pip install with and without bytecode compilation, plus the first import")
    inst.add_argument("--spec", default="", help="what pip installs (default: -e <repo>[dev], as make does)")
    inst.add_argument("--constraints", default=str(ROOT / "constraints-cpu.txt"), help="pip's -c file ('' for none)")
    inst.add_argument("--pip-args", default="", help="more pip install arguments, one string")
    inst.add_argument("--imports", default=",".join(STREAM_IMPORTS), help="comma-separated modules imported after the install")
    inst.add_argument("--python", default=sys.executable, help="the interpreter that creates the venvs")
    inst.add_argument("--no-upgrade-pip", dest="upgrade_pip", action="store_false",
                      help="keep the venv's own pip (make upgrades it first; not timed)")
    inst.add_argument("--rounds", type=int, default=1)
    inst.add_argument("--tmp", default=None)
    inst.set_defaults(func=bench_install)
    step = sub.add_parser("step", help="the training step with and without answer-only logits and a shared vision pass")
    step.add_argument("--config", default=str(CONFIGS / "tiny-cpu.yaml"))
    step.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    step.add_argument("--task", default="compose")
    step.add_argument("--steps", type=int, default=20, help="steps per variant and round")
    step.add_argument("--rounds", type=int, default=2)
    step.add_argument("--tmp", default=None)
    step.set_defaults(func=bench_step)
    stream = sub.add_parser("stream", help="driver peak RSS of a Ray stream over a generated JPEG benchmark")
    stream.add_argument("--records", type=int, default=3000)
    stream.add_argument("--tasks", type=int, default=4)
    stream.add_argument("--test-every", type=int, default=10, help="one record in this many is a test record")
    stream.add_argument("--steps", type=int, default=50, help="train.steps_per_task")
    stream.add_argument("--config", default=str(CONFIGS / "smoke.yaml"))
    stream.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    stream.add_argument("--tmp", default=None, help="folder for the generated benchmark and the run")
    stream.set_defaults(func=bench_stream)
    srv = sub.add_parser("serve", help="HTTP p50/p99 latency and requests/s of the Serve app, batched vs unbatched")
    srv.add_argument("--run", help="a stream's run directory (default: run a smoke stream first)")
    srv.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override of the smoke stream's config (without --run)")
    srv.add_argument("--clients", type=int, default=8, help="concurrent closed-loop clients")
    srv.add_argument("--seconds", type=float, default=20.0, help="measured load per variant")
    srv.add_argument("--warmup", type=float, default=3.0, help="unmeasured load first, per variant")
    srv.add_argument("--max-batch-size", type=int, default=8)
    srv.add_argument("--cpus-per-replica", type=float, default=None, help="default: the run's train.cpus_per_worker")
    srv.add_argument("--port", type=int, default=8000)
    srv.set_defaults(func=bench_serve)
    return parser


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
