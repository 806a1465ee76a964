"""Closed-loop HTTP load on ``POST /v1/answer``: N clients, each sending its next request as soon as
the previous one is answered (bench.py serve measures with it; the serving tests load with it)."""
from __future__ import annotations

import base64
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import requests

from cram_ray.data.records import Record


@dataclass(frozen=True)
class Outcome:
    """One request: when it was answered (seconds since the load began), how long it took, its HTTP
    status (None: no response) and the ``after_task`` of the answer (or the error text)."""

    end: float
    latency: float
    status: Optional[int]
    detail: object


def payload(rec: Record) -> dict[str, str]:
    return {"image": base64.b64encode(rec.image or b"").decode(), "question": rec.instruction}


def closed_loop(url: str, records: Sequence[Record], *, clients: int, seconds: float,
                until: Callable[[list[Outcome]], bool] = lambda _: True, limit: float = 600.0) -> list[Outcome]:
    """Load ``url`` for ``seconds``, then on until ``until(outcomes)`` holds (at most ``limit`` s)."""
    bodies = [payload(r) for r in records]
    outcomes: list[Outcome] = []
    stop = threading.Event()
    t0 = time.perf_counter()

    def client(k: int) -> None:
        with requests.Session() as session:
            i = k
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    r = session.post(f"{url}/v1/answer", json=bodies[i % len(bodies)], timeout=120)
                    detail = r.json().get("after_task") if r.status_code == 200 else r.text
                    status: Optional[int] = r.status_code
                except requests.RequestException as err:
                    status, detail = None, repr(err)
                end = time.perf_counter()
                outcomes.append(Outcome(end - t0, end - start, status, detail))
                i += clients

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    while True:
        time.sleep(0.2)
        elapsed = time.perf_counter() - t0
        if (elapsed >= seconds and until(outcomes)) or elapsed >= limit:
            break
    stop.set()
    for t in threads:
        t.join()
    return outcomes


def summary(outcomes: list[Outcome], seconds: float) -> dict[str, float]:
    """p50 / p99 latency (ms) of the answered requests and answered requests per second."""
    ok = [o.latency for o in outcomes if o.status == 200]
    lat = np.array(ok) * 1000.0 if ok else np.array([float("nan")])
    return {"requests": len(outcomes), "ok": len(ok), "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "rps": len(ok) / seconds}
