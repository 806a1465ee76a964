"""workflows/serve.py --follow on a short finished stream (conftest.py), over real HTTP: the evaluation's and predict's answers,
4xx for malformed requests, and no failed request while a newly committed task is rolled out."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
from conftest import ROOT, b64, evaluation, png

import predict
from cram_ray.pipeline.context import task_records
from cram_ray.serving.load import closed_loop, payload
from cram_ray.serving.run import find_run, run_context

pytestmark = pytest.mark.ray
HELD = "_DONE.json.held"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smoke_run):
    """serve.py --follow on a copy of the run whose last task is not committed yet."""
    out = tmp_path_factory.mktemp("served") / "out"
    shutil.copytree(smoke_run[0], out)
    run_dir = out / "s"
    marker = run_dir / "task_2/aggregate/_DONE.json"
    marker.rename(marker.with_name(HELD))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = open(out.parent / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "workflows/serve.py"), "--run", str(run_dir), "--port", str(port), "--follow",
         "--poll", "1", "--max-replicas", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (out.parent / "serve.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or no replica ready to answer
                pass
            assert time.time() < deadline, "serve.py did not answer /healthz in 300 s"
            time.sleep(1)
        yield url, run_dir
    finally:
        proc.send_signal(signal.SIGTERM)  # serve.py shuts Serve and its embedded Ray down
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _ask(session, url, rec):
    return session.post(f"{url}/v1/answer", json=payload(rec), timeout=120)


def _records(run_dir, tasks):
    ctx = run_context(find_run(str(run_dir)))
    return [rec for t in tasks for rec in task_records(ctx, t, "test")]


def _ask_all(url, records, clients=8):
    """Answers to every record, asked by ``clients`` concurrent clients (so requests share batches)."""
    answers = {}

    def work(part):
        with requests.Session() as s:
            for rec in part:
                r = _ask(s, url, rec)
                assert r.status_code == 200, r.text
                answers[rec.id] = r.json()
    threads = [threading.Thread(target=work, args=(records[k::clients],)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_served_answers_equal_predict_and_the_evaluation_stage(server, tmp_path, smoke_manifest):
    url, run_dir = server
    assert requests.get(f"{url}/healthz").json()["after_task"] == 1  # task 2 is not committed yet
    records = _records(run_dir, [0, 1])
    served = _ask_all(url, records)
    stored = {r["id"]: r for r in evaluation(run_dir, 1)}
    out = tmp_path / "p.jsonl"
    assert predict.main(["--run", str(run_dir), "--input", str(smoke_manifest), "--out", str(out)]) == 0
    predicted = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(served) == set(stored)
    for rid, got in served.items():
        assert (got["answer"], got["routed_task"]) == (stored[rid]["prediction"], stored[rid]["routed_task"]), rid
        p = predicted[rid]
        assert (got["answer"], got["routed_task"], got["group"], got["after_task"]) == \
               (p["answer"], p["routed_task"], p["group"], p["after_task"])
        assert got["weights"] == pytest.approx(p["weights"], abs=1e-5)


def test_a_multipart_upload_is_answered_like_the_json_body(server):
    url, run_dir = server
    rec = _records(run_dir, [1])[0]
    form = requests.post(f"{url}/v1/answer", files={"image": ("x.png", rec.image, "image/png")},
                         data={"question": rec.instruction}, timeout=120)
    assert form.status_code == 200, form.text
    got, want = form.json(), _ask(requests, url, rec).json()
    assert {k: v for k, v in got.items() if k != "weights"} == {k: v for k, v in want.items() if k != "weights"}
    assert got["weights"] == pytest.approx(want["weights"], abs=1e-5)


@pytest.mark.parametrize("kwargs, status, words", [
    ({"data": b"{oops", "headers": {"content-type": "application/json"}}, 400, ["not JSON"]),
    ({"json": {"question": "What is it?"}}, 400, ["missing", "'image'"]),
    ({"json": {"image": b64(b"not an image"), "question": "What is it?"}}, 400, ["cannot decode"]),
    ({"json": {"image": b64(png()), "question": "   "}}, 400, ["'question'", "empty"]),
    ({"json": {"image": b64(png(8000, 6000)), "question": "q"}}, 413, ["max_image_pixels"]),
    ({"data": b"hello", "headers": {"content-type": "text/plain"}}, 415, ["content type"]),
    ({"files": {"question": (None, "What?")}}, 400, ["'image'"]),
])
def test_a_malformed_request_gets_a_4xx_with_one_line(server, kwargs, status, words):
    url, _ = server
    r = requests.post(f"{url}/v1/answer", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    msg = r.json()["error"]
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_experts_lists_the_tasks_and_groups_loaded(server):
    url, _ = server
    got = requests.get(f"{url}/v1/experts", timeout=30).json()
    assert got["after_task"] == 1 and got["method"] == "cram"
    assert [t["name"] for t in got["tasks"]] == ["count", "classify"]
    assert all(t["params_added"] > 0 and t["rank_max"] >= 1 for t in got["tasks"])
    assert sorted(n for g in got["groups"] for n in g["tasks"]) == ["classify", "count"]


def test_no_request_fails_while_a_new_task_is_rolled_out_under_load(server):
    url, run_dir = server
    records = _records(run_dir, [0, 1, 2])
    held = run_dir / "task_2/aggregate" / HELD
    commit = threading.Timer(3.0, held.rename, args=(held.with_name("_DONE.json"),))  # the stream commits task 2
    commit.start()
    # 8 clients for 20 s at least, and on until the new state answers (the rollout restores a replica)
    outcomes = closed_loop(url, records, clients=8, seconds=20,
                           until=lambda done: all(o.detail == 2 for o in done[-16:]), limit=240)
    commit.join()
    failed = [o for o in outcomes if o.status != 200]
    assert not failed, failed[:3]
    ordered = sorted(outcomes, key=lambda o: o.end)
    # while the new replica starts, the old one answers; during the switch both may (a request that
    # ends later may still have been answered by the old one), after it only the new one does
    assert ordered[0].detail == 1, ordered[0]
    assert all(o.detail == 2 for o in ordered[-16:]), "task 2 was not rolled out within 240 s"
    served = _ask_all(url, records[-16:])  # task 2's test records, after task 2
    assert {v["after_task"] for v in served.values()} == {2}
    stored = {r["id"]: r for r in evaluation(run_dir, 2)}
    assert all((v["answer"], v["routed_task"]) == (stored[k]["prediction"], stored[k]["routed_task"])
               for k, v in served.items())
