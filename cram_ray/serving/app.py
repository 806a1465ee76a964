"""The Ray Serve application: a FastAPI ingress over replicas that each hold a :class:`ServedModel`.

Routes: ``POST /v1/answer`` (JSON ``{"image": base64, "question": text}`` or a multipart form with an
``image`` file and a ``question``; optional ``task``) -> ``{"answer", "routed_task", "group",
"weights", "after_task", ...}``; ``GET /v1/experts``; ``GET /healthz``. A request the server refuses
gets a 4xx and ``{"error": one line}``; it is checked before it joins a batch, so one bad request
never fails the others of its batch.

Answers are batched across concurrent requests (``@serve.batch``; size and wait set per deployment)
and the deployment autoscales between ``min_replicas`` and ``max_replicas`` on ongoing requests.

Following a stream: the driver (workflows/serve.py --follow) redeploys the application with the
newly committed task as the replicas' ``after_task``. The Python API gives every deploy a new code
version, so Serve rolls out new replicas; with ``max_surge_percent=100`` the old replicas keep
answering until their replacements are ready, then drain. (A ``user_config`` change through
``reconfigure`` would be the in-place alternative, but from the Python API it restarts replicas
just the same.)
"""
# no `from __future__ import annotations` here: FastAPI reads the route methods' annotations
# (``request: Request``) as objects once Serve has wrapped the class

import asyncio
import dataclasses
import itertools
import os
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from cram_ray.data.records import DataError, Record
from cram_ray.serving.inputs import RequestError, RequestLimits, form_question, json_question
from cram_ray.serving.run import RunRef

APP_NAME = "cram"
DEPLOYMENT = "CramAnswerer"


@dataclass(frozen=True)
class ServeOptions:
    """How the application is deployed (not part of the run's config: the same run can be served
    in many ways)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 8  # requests answered in one forward pass
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0  # autoscaling target per replica (about one full batch)
    cpus_per_replica: Optional[float] = None  # None: the run's train.cpus_per_worker
    gpus_per_replica: Optional[float] = None  # None: 1 if the run trained on GPUs, else 0
    limits: RequestLimits = RequestLimits()

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"replicas: expected 1 <= min_replicas <= max_replicas, got "
                             f"{self.min_replicas}..{self.max_replicas}")
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ValueError("batching: expected max_batch_size >= 1 and batch_wait_timeout_s >= 0")


api = FastAPI(title="cram_ray", description="Answers with a continual stream's model")


@api.exception_handler(RequestError)
async def _refused(_: Request, err: RequestError) -> JSONResponse:
    return JSONResponse({"error": str(err)}, status_code=err.status)


@serve.deployment(name=DEPLOYMENT, max_surge_percent=100)
@serve.ingress(api)
class CramAnswerer:
    """One replica: the run's model after ``after_task``, answering batches of requests."""

    def __init__(self, run: dict[str, str], after_task: int, limits: dict[str, int], batching: dict[str, Any]) -> None:
        from cram_ray.serving.model import ServedModel
        from cram_ray.serving.run import run_context

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.model = ServedModel(run_context(RunRef(**run)), after_task)
        self.limits = RequestLimits(**limits)
        self._ids = itertools.count()
        self._answer_batch.set_max_batch_size(int(batching["max_batch_size"]))
        self._answer_batch.set_batch_wait_timeout_s(float(batching["batch_wait_timeout_s"]))

    @api.post("/v1/answer")
    async def answer(self, request: Request) -> dict[str, Any]:
        image, question, task = await self._read(request)
        try:
            index = self.model.task_index(task)
        except DataError as err:
            raise RequestError(400, str(err)) from None
        record = Record(id=f"request-{next(self._ids)}", task=task or "", image=image, instruction=question,
                        answer="", metric="exact")
        return await self._answer_batch((record, index))

    @api.get("/v1/experts")
    def experts(self) -> dict[str, Any]:
        return self.model.experts()

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "run_id": self.model.ctx.run_id, "after_task": self.model.after_task}

    async def _read(self, request: Request) -> tuple[bytes, str, Optional[str]]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=3)
            except Exception as err:  # starlette reports a malformed body as assorted exception types
                raise RequestError(400, f"request form: cannot parse the multipart body ({type(err).__name__})") from None
            upload = form.get("image")
            image = None
            if upload is not None:
                if isinstance(upload, str):
                    raise RequestError(400, "request form field 'image': expected a file upload, got text")
                image = await upload.read(self.limits.max_image_bytes + 1)
            return form_question(image, form.get("question"), form.get("task"), self.limits)
        if kind not in ("application/json", ""):
            raise RequestError(415, f"request content type {kind!r}: expected application/json or multipart/form-data")
        body = await request.body()
        return json_question(body, self.limits)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _answer_batch(self, items: list[tuple[Record, int]]) -> list[dict[str, Any]]:
        # generation is a blocking torch call: run it off the event loop so health checks and
        # request parsing go on meanwhile
        records, index = [r for r, _ in items], [i for _, i in items]
        return await asyncio.to_thread(self.model.answer, records, index)


def build_app(run: RunRef, after_task: int, options: ServeOptions, *, use_gpu: bool, cpus: float):
    """The bound application serving ``run`` after ``after_task``."""
    gpus = options.gpus_per_replica if options.gpus_per_replica is not None else (1.0 if use_gpu else 0.0)
    deployment = CramAnswerer.options(
        ray_actor_options={"num_cpus": options.cpus_per_replica if options.cpus_per_replica is not None else cpus,
                           "num_gpus": gpus},
        autoscaling_config={"min_replicas": options.min_replicas, "initial_replicas": options.min_replicas,
                            "max_replicas": options.max_replicas,
                            "target_ongoing_requests": options.target_ongoing_requests},
        max_ongoing_requests=max(2 * options.max_batch_size, int(2 * options.target_ongoing_requests)),
    )
    batching = {"max_batch_size": options.max_batch_size, "batch_wait_timeout_s": options.batch_wait_timeout_s}
    return deployment.bind(dataclasses.asdict(run), after_task, dataclasses.asdict(options.limits), batching)


def deploy(run: RunRef, after_task: int, options: ServeOptions, *, use_gpu: bool, cpus: float) -> None:
    """Start Serve's HTTP proxy on ``options.host:port`` (once) and (re)deploy the application."""
    serve.start(http_options={"host": options.host, "port": options.port})
    serve.run(build_app(run, after_task, options, use_gpu=use_gpu, cpus=cpus), name=APP_NAME, route_prefix="/")
