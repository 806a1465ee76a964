"""Under Ray the console shows the project's lines once and errors; everything else goes to a file."""
import pytest

from cram_ray.pipeline import logs


@pytest.fixture
def log_dir(tmp_path):
    logs.set_log_dir(tmp_path / "logs")
    yield tmp_path / "logs"
    logs.set_log_dir(None)


def batch(*lines, **extra):
    return {"lines": list(lines), "pid": 7, "actor_name": "RayTrainWorker", "is_err": False, **extra}


def test_project_lines_reach_the_console_once_and_ray_chatter_only_the_file(log_dir, capsys):
    printed_by_ray = []
    handle = logs.filtered_printer(printed_by_ray.append)
    handle(batch("[task 1/3 count] train 5/10 2.00 it/s ETA 3s ce=1.0000",
                 "Failed to query Ray Train Controller actor state. Continuing to monitor.",
                 "[base] step 40/40 loss=4.3670"))
    handle(batch("WARNING: 8 PYTHON worker processes have been started on node", pid="raylet"))
    out = capsys.readouterr().out.splitlines()
    assert out == ["[task 1/3 count] train 5/10 2.00 it/s ETA 3s ce=1.0000", "[base] step 40/40 loss=4.3670"]
    assert printed_by_ray == []
    text = (log_dir / "ray.log").read_text()
    assert "Failed to query Ray Train Controller" in text and "PYTHON worker processes" in text
    assert "(RayTrainWorker pid=7) [base] step 40/40" in text


def test_a_batch_with_an_error_is_printed_as_ray_prints_it(log_dir, capsys):
    printed_by_ray = []
    handle = logs.filtered_printer(printed_by_ray.append)
    error = batch("Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: bad", is_err=True)
    handle(error)
    assert printed_by_ray == [error]
    assert capsys.readouterr().out == ""


def test_raylet_warnings_go_to_the_file_and_its_other_messages_to_the_console(log_dir):
    printed_by_ray = []
    handle = logs.raylet_printer(lambda data, **kw: printed_by_ray.append(data))
    handle({"lines": ["WARNING: 12 PYTHON worker processes have been started"], "pid": "raylet"}, ignore_prefix=False)
    killed = {"lines": ["A worker died or was killed while executing a task"], "pid": "raylet"}
    handle(killed, ignore_prefix=False)
    assert printed_by_ray == [killed]
    assert "PYTHON worker processes" in (log_dir / "ray.log").read_text()


def test_project_line_pattern():
    ours, error = logs.split_batch(["[task 12/12 ocr] evaluate: scores 1.0", "[ray] task 0: Train run",
                                    "[taskforce] not ours", "Loading weights: 100%"])
    assert ours == ["[task 12/12 ocr] evaluate: scores 1.0", "[ray] task 0: Train run"] and not error


def test_closing_lines_name_every_output_and_the_mlflow_command(tmp_path, log_dir):
    from cram_ray.pipeline.run import where_text

    for name in ("summary.json", "accuracy_matrix.png", "rank_map.png"):
        (tmp_path / name).write_text("x")
    logs._write(["a Ray line"])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    text = where_text(tmp_path, uri, "abc123")
    assert f"{tmp_path / 'summary.json'}" in text and f"{tmp_path / 'rank_map.png'}" in text
    assert "routing_confusion.png" not in text  # not written: not named
    assert f"mlflow ui --backend-store-uri {uri}" in text and "abc123" in text
    assert str(log_dir / "ray.log") in text
