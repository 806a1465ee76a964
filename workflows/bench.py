"""Micro-benchmarks of cram_ray's building blocks: ``python workflows/bench.py <subcommand>``.

Subcommands:
  rank   time CRAM's adaptive-rank allocation over the target linears of a 7B-sized model
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
