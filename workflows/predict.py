"""Answer a file of questions with a stream's model after one of its tasks; write predictions JSONL.

    python workflows/predict.py --run DIR --input FILE [--after-task N] [--out FILE.jsonl]
                                [--image-root DIR] [--task NAME] [--split test|train]
                                [--ray-threshold N] [--address HOST:PORT]

DIR is a stream's run directory ``<out>/<run_id>`` (or an ``<out>`` holding one run), finished or
still running. FILE is LLaVA-style JSON (``[{"id", "image", "conversations": [{"from": "human",
"value": "<image>\\n..."}, ...]}]``, images relative to FILE's folder or ``--image-root``; answers
optional) or a benchmark manifest YAML (the ``--split`` records of every task). Each output line
holds the record's id, ``answer`` and the routing decision (``routed_task``, ``routed_task_name``,
``group``, ``weights``), ``after_task``, and, when the record has a reference answer, ``reference``
(and ``score`` when its task is known: a manifest, or ``--task``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cram_ray.cli import fail_cleanly
from cram_ray.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from cram_ray.serving.predict import RAY_THRESHOLD

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the stream's run directory <out>/<run_id> (or an --out with one run)")
    parser.add_argument("--input", required=True, help="LLaVA-style JSON file or benchmark manifest YAML")
    parser.add_argument("--after-task", type=int, help="serve the model as it was after this task (0-based; "
                        "default: the last task whose end-of-task state is committed)")
    parser.add_argument("--out", help="predictions JSONL (default: stdout)")
    parser.add_argument("--image-root", help="folder the JSON's image paths are relative to (default: the JSON's folder)")
    parser.add_argument("--task", help="the stream task every record of a JSON input belongs to (scores the "
                        "answers; needed by a method that routes by the true task, e.g. oracle)")
    parser.add_argument("--split", default="test", choices=["test", "train"], help="a manifest's split to answer")
    parser.add_argument("--ray-threshold", type=int, default=RAY_THRESHOLD,
                        help=f"from this many records on, Ray Data batch inference on an actor pool (default {RAY_THRESHOLD})")
    parser.add_argument("--address", help="Ray cluster to join for batch inference (default: RAY_ADDRESS if set, "
                        "else an embedded cluster on 127.0.0.1)")
    return parser


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cram_ray.serving.inputs import read_questions
    from cram_ray.serving.predict import predict
    from cram_ray.serving.run import find_run, resolve_after_task, run_context

    if args.ray_threshold < 1:
        raise ConfigError(f"--ray-threshold {args.ray_threshold}: expected a positive number of records")
    ref = find_run(args.run)
    ctx = run_context(ref)
    if args.address:
        ctx.cfg = ctx.cfg.replace(**{"train.ray_address": args.address})
    after = resolve_after_task(ctx, args.after_task)
    metric = None
    if args.task is not None:
        names = [t.name for t in ctx.tasks]
        if args.task not in names:
            raise ConfigError(f"--task {args.task!r}: the run's tasks are {', '.join(names)}")
        metric = ctx.tasks[names.index(args.task)].metric
    questions = read_questions(args.input, image_root=args.image_root, task=args.task, metric=metric, split=args.split)
    rows, how = predict(ref, ctx, after, questions, ray_threshold=args.ray_threshold)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(lines)
    else:
        sys.stdout.write(lines)
    scored = [r["score"] for r in rows if "score" in r]
    summary = f"[predict] {len(rows)} answers ({how}) by run {ctx.run_id} after task {after} ({ctx.tasks[after].name})"
    if scored:
        summary += f"; mean score {100.0 * sum(scored) / len(scored):.1f} over {len(scored)} scored"
    print(summary + (f"; written to {args.out}" if args.out else ""), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
