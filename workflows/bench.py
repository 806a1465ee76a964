"""Micro-benchmarks of cram_ray's building blocks: ``python workflows/bench.py <subcommand>``.

Subcommands:
  rank   time CRAM's adaptive-rank allocation over the target linears of a 7B-sized model
  base   does the tiny base read its images? held-out exact match per question, beside the same
         questions asked with the images shuffled between records
  probe  how much of each built-in task's answer a linear classifier reads from the base's
         projected image tokens (test accuracy of a logistic regression per task)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


import torch  # noqa: E402

from cram_ray.methods.cram.rank import allocate  # noqa: E402


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
    """(config, the cached tiny base of ``args.config`` as its streams on the built-in benchmark use it)."""
    from cram_ray.config import load_config
    from cram_ray.data.builtin import vocabulary_texts
    from cram_ray.models.base import get_base_vlm

    cfg = load_config(args.config, args.overrides)
    if cfg.model.kind != "tiny" or cfg.data.benchmark:
        raise SystemExit(f"error: bench.py {command}: expected the tiny model on the built-in benchmark")
    return cfg, get_base_vlm(cfg, sorted(set(vocabulary_texts())))  # the corpus prepare_data writes


def bench_base(args: argparse.Namespace) -> None:
    """Greedy exact match of the cached (or newly trained) tiny base on held-out mix records, per
    question, with the true images and with the images shuffled between records."""
    import collections
    import dataclasses

    import numpy as np

    from cram_ray.data.pretrain_mix import pretrain_records
    from cram_ray.models.base import HELDOUT_SEED_OFFSET, greedy_answers

    torch.manual_seed(0)
    cfg, vlm = tiny_base(args, "base")
    records = pretrain_records(args.records, cfg.model.image_size, cfg.model.base.seed + HELDOUT_SEED_OFFSET)
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
    print(f"base {vlm.meta.get('base_dir')}: {vlm.meta.get('steps')} steps, "
          f"{vlm.meta.get('train_seconds')} s training, vision warm-up accuracy {vlm.meta.get('vision_warmup_accuracy')}")
    print(f"{'question':44s} {'n':>4s} {'exact %':>8s} {'shuffled %':>10s}")
    for q, (c, hit, hit_shuffled) in sorted(table.items(), key=lambda kv: -kv[1][0]):
        print(f"{q[:44]:44s} {c:4d} {100 * hit / c:8.1f} {100 * hit_shuffled / c:10.1f}")
    print(f"{'all':44s} {n:4d} {100 * sum(v[1] for v in table.values()) / n:8.1f} "
          f"{100 * sum(v[2] for v in table.values()) / n:10.1f}")
    print(f"answers that change when the images are shuffled: {100 * sum(a != b for a, b in zip(real, fake)) / n:.1f}%")
    transfer = stream_canvas_records(cfg, args.records // 4)
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
            img, question, answer = B.make_example(task, "test", i, cfg.data.builtin.image_size, False, cfg.data.builtin.seed)
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
    base.add_argument("--config", default=str(Path(__file__).resolve().parent / "configs/tiny-cpu.yaml"))
    base.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    base.add_argument("--records", type=int, default=400, help="held-out mix records")
    base.set_defaults(func=bench_base)

    probe = sub.add_parser("probe", help="linear probes of the base's image tokens on the built-in tasks")
    probe.add_argument("--config", default=str(Path(__file__).resolve().parent / "configs/tiny-cpu.yaml"))
    probe.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    probe.add_argument("--tasks", default="", help="comma-separated task names (default: all)")
    probe.set_defaults(func=bench_probe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
