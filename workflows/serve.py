"""Serve a stream's model over HTTP with Ray Serve (FastAPI ingress, dynamic batching, autoscaling).

    python workflows/serve.py --run DIR [--after-task N] [--host 127.0.0.1] [--port 8000] [--follow]
                              [--address HOST:PORT] [--max-batch-size 8] [--min-replicas 1] [--max-replicas 2]

Routes: ``POST /v1/answer`` with JSON ``{"image": base64 PNG/JPEG, "question": text}`` or a multipart
form (``image`` file, ``question``) -> ``{"answer", "routed_task", "group", "weights", "after_task"}``;
``GET /v1/experts``; ``GET /healthz``. A malformed request gets a 4xx with one line.

Ray: an embedded cluster on 127.0.0.1 (as the stream starts), or the cluster named by ``--address``
or ``RAY_ADDRESS``. ``--follow`` watches the run's ledger and, when the stream commits a new task's
end-of-task state, rolls out replicas holding it (the old ones answer until the new are ready). Runs
until interrupted (Ctrl-C or SIGTERM), then shuts Serve down.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time

from cram_ray.cli import fail_cleanly
from cram_ray.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    from cram_ray.serving.app import ServeOptions
    from cram_ray.serving.inputs import RequestLimits

    d, lim = ServeOptions(), RequestLimits()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the stream's run directory <out>/<run_id> (or an --out with one run)")
    parser.add_argument("--after-task", type=int, help="the task whose end-of-task state to serve (default: the last "
                        "committed; with --follow, the starting point)")
    parser.add_argument("--host", default=d.host, help=f"HTTP host (default {d.host})")
    parser.add_argument("--port", type=int, default=d.port, help=f"HTTP port (default {d.port})")
    parser.add_argument("--follow", action="store_true",
                        help="load each new task's state as the stream commits it (waits for the first if none yet)")
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between ledger checks with --follow (default 5)")
    parser.add_argument("--address", help="Ray cluster to join, GCS host:port (default: RAY_ADDRESS if set, else an "
                        "embedded cluster on 127.0.0.1)")
    parser.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="requests per forward pass")
    parser.add_argument("--batch-wait-ms", type=float, default=1000 * d.batch_wait_timeout_s,
                        help="how long a batch waits to fill (ms)")
    parser.add_argument("--min-replicas", type=int, default=d.min_replicas)
    parser.add_argument("--max-replicas", type=int, default=d.max_replicas)
    parser.add_argument("--target-ongoing-requests", type=float, default=d.target_ongoing_requests,
                        help="autoscaling target of requests in flight per replica")
    parser.add_argument("--cpus-per-replica", type=float, help="default: the run's train.cpus_per_worker")
    parser.add_argument("--gpus-per-replica", type=float, help="default: 1 if the run trained on GPUs, else 0")
    parser.add_argument("--max-image-bytes", type=int, default=lim.max_image_bytes)
    parser.add_argument("--max-image-pixels", type=int, default=lim.max_image_pixels)
    parser.add_argument("--max-question-chars", type=int, default=lim.max_question_chars)
    return parser


def options_of(args: argparse.Namespace):
    from cram_ray.serving.app import ServeOptions
    from cram_ray.serving.inputs import RequestLimits

    for flag in ("port", "max_image_bytes", "max_image_pixels", "max_question_chars"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a positive integer")
    if args.poll <= 0:
        raise ConfigError(f"--poll {args.poll}: expected a positive number of seconds")
    try:
        return ServeOptions(
            host=args.host, port=args.port, max_batch_size=args.max_batch_size,
            batch_wait_timeout_s=args.batch_wait_ms / 1000.0, min_replicas=args.min_replicas,
            max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests,
            cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica,
            limits=RequestLimits(args.max_image_bytes, args.max_image_pixels, args.max_question_chars))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _stop(signum, frame):  # SIGTERM ends the server like Ctrl-C: Serve is shut down on the way out
    raise KeyboardInterrupt


@fail_cleanly
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = options_of(args)
    from cram_ray.serving.run import committed_tasks, find_run, resolve_after_task, run_context

    ref = find_run(args.run)
    ctx = run_context(ref)
    if args.address:
        ctx.cfg = ctx.cfg.replace(**{"train.ray_address": args.address})
    signal.signal(signal.SIGTERM, _stop)
    try:
        if args.follow and args.after_task is None and committed_tasks(ctx) == 0:
            print(f"[serve] run {ref.run_id}: waiting for its first task to finish", flush=True)
            while committed_tasks(ctx) == 0:
                time.sleep(args.poll)
        after = resolve_after_task(ctx, args.after_task)
        serve_forever(ref, ctx, after, options, follow=args.follow, poll=args.poll)
    except KeyboardInterrupt:
        pass
    return 0


def serve_forever(ref, ctx, after: int, options, *, follow: bool, poll: float) -> None:
    import ray
    from ray import serve

    from cram_ray.pipeline.ray_cluster import connect
    from cram_ray.serving.app import deploy
    from cram_ray.serving.run import committed_tasks

    how = connect(ctx.cfg.train)
    train = ctx.cfg.train
    names = [t.name for t in ctx.tasks]
    try:
        deploy(ref, after, options, use_gpu=train.use_gpu, cpus=train.cpus_per_worker)
        print(f"[serve] http://{options.host}:{options.port}/v1/answer: run {ref.run_id} ({ctx.cfg.method.name}) "
              f"after task {after} ({names[after]})" + ("; following the stream" if follow else ""), flush=True)
        while True:
            time.sleep(poll)
            if not follow:
                continue
            last = committed_tasks(ctx) - 1
            if last > after:
                print(f"[serve] task {last} ({names[last]}) committed: rolling out its state", flush=True)
                deploy(ref, last, options, use_gpu=train.use_gpu, cpus=train.cpus_per_worker)
                after = last
                print(f"[serve] now answering after task {after} ({names[after]})", flush=True)
    finally:
        serve.shutdown()
        if how == "local":
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
