"""Answers for a file of records: in this process for small inputs, Ray Data batch inference for large.

Both paths answer through :class:`ServedModel` (hence through the evaluation's own answering
function) in batches of the run's ``eval_batch_size``. The Ray path streams the records through
``map_batches`` on an actor pool shaped like the evaluation stage's (one actor per Train worker's
resources, a GPU each when the run trained on GPUs); each actor restores the model once.

Why a threshold: the Ray path pays for starting (or joining) Ray and for restoring the model in
every actor before its first answer, which only parallel actors (or GPUs) win back. Measured on the
smoke model on a loaded 2-core machine: restoring took 16 s and the in-process path answered about
10 records/s, so with two actors the pool breaks even near 500 records (other models and hardware
move that point both ways). The default (:data:`RAY_THRESHOLD`, 1000 records) keeps every small file
in-process; ``--ray-threshold`` moves it.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np

from cram_ray.pipeline.context import StageContext
from cram_ray.serving.inputs import Question
from cram_ray.serving.run import RunRef

RAY_THRESHOLD = 1000


def output_rows(questions: list[Question], answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One predictions.jsonl row per question: id, task, the answer with its routing, and the
    reference answer and score when the record carries one and its task (metric) is known."""
    from cram_ray.eval.scorers import score

    rows = []
    for q, ans in zip(questions, answers):
        rec = q.record
        row: dict[str, Any] = {"id": rec.id}
        if rec.task:
            row["task"] = rec.task
        row.update(ans)
        if rec.answer:
            row["reference"] = rec.answer
            if q.known_task:
                row["score"] = score(rec.metric, ans["answer"], rec.answer)
        rows.append(row)
    return rows


def predict_local(ctx: StageContext, after_task: int, questions: list[Question],
                  task_index: list[int]) -> list[dict[str, Any]]:
    from cram_ray.serving.model import ServedModel

    return ServedModel(ctx, after_task).answer([q.record for q in questions], task_index)


class Predictor:
    """Ray Data actor: the run's model after one task; answers each batch of rows."""

    def __init__(self, run: dict[str, str], after_task: int) -> None:
        from cram_ray.serving.model import ServedModel
        from cram_ray.serving.run import run_context

        self.model = ServedModel(run_context(RunRef(**run)), after_task)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cram_ray.train.ingest import records_of

        answers = self.model.answer(records_of(rows), [int(i) for i in rows["task_index"]])
        return {"position": rows["position"], "answer": np.array([json.dumps(a) for a in answers], dtype=object)}


def predict_ray(ctx: StageContext, ref: RunRef, after_task: int, questions: list[Question],
                task_index: list[int]) -> list[dict[str, Any]]:
    import dataclasses

    import ray.data

    from cram_ray.pipeline.ray_cluster import connect
    from cram_ray.pipeline.ray_data_stages import _pool

    connect(ctx.cfg.train)
    items = [{**q.record.to_row(), "task_index": i, "position": k}
             for k, (q, i) in enumerate(zip(questions, task_index))]
    out = ray.data.from_items(items).map_batches(
        Predictor, fn_constructor_kwargs={"run": dataclasses.asdict(ref), "after_task": after_task},
        batch_size=ctx.cfg.train.eval_batch_size, batch_format="numpy", **_pool(ctx, gpu=True))
    answers: list[Optional[dict[str, Any]]] = [None] * len(questions)
    for row in out.iter_rows():
        answers[int(row["position"])] = json.loads(row["answer"])
    missing = [questions[k].record.id for k, a in enumerate(answers) if a is None]
    if missing:
        raise RuntimeError(f"predict: no answer for {len(missing)} records (first: {missing[0]})")
    return answers  # type: ignore[return-value]


def predict(ref: RunRef, ctx: StageContext, after_task: int, questions: list[Question], *,
            ray_threshold: int = RAY_THRESHOLD) -> tuple[list[dict[str, Any]], str]:
    """(rows, "local" | "ray"): the answers to ``questions`` after ``after_task``."""
    from cram_ray.methods import make_method
    from cram_ray.serving.model import task_index

    names = [t.name for t in ctx.tasks[: after_task + 1]]
    method = make_method(ctx.cfg)  # its routing rule only: no model is built here
    index = [task_index(names, q.record.task, method) for q in questions]
    if len(questions) < ray_threshold:
        return output_rows(questions, predict_local(ctx, after_task, questions, index)), "local"
    return output_rows(questions, predict_ray(ctx, ref, after_task, questions, index)), "ray"
