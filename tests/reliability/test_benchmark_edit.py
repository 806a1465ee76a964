"""A user's benchmark edited between two runs of the same command: the resume refuses in one line
naming the edited file, ``--restart`` reruns from the data stage, and no run writes anywhere but
``--out`` and the cache (not the working directory, HOME or the temporary directory)."""
from __future__ import annotations

import json
import tempfile

from conftest import TINY, one_error_line, run_stream, summary_of, tree_digest

from cram_ray.config import load_config
from cram_ray.data.builtin import generate_builtin

ALL_STAGES = 15


def test_an_edited_answer_file_refuses_the_resume_and_restart_reruns_it(tmp_path, cache_dir, monkeypatch, capsys):
    home, cwd, tmp, runs = tmp_path / "home", tmp_path / "cwd", tmp_path / "tmp", tmp_path / "runs"
    for folder in (home, cwd, tmp, runs):
        folder.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.chdir(cwd)
    manifest = generate_builtin(load_config(None, [s for s in TINY if s != "--set"]).data.builtin, tmp_path / "bench")
    out = runs / "out"
    command = ["--benchmark", str(manifest), "--run-id", "mine"]

    before = tree_digest(tmp_path)
    assert run_stream(out, cache_dir, *command) == 0
    assert tree_digest(tmp_path, skip=(out,)) == before

    answers = manifest.parent / "instructions" / "count" / "test.json"
    records = json.loads(answers.read_text())
    records[0]["conversations"][1]["value"] = "7"
    answers.write_text(json.dumps(records))
    before = tree_digest(tmp_path)
    capsys.readouterr()
    assert run_stream(out, cache_dir, *command) == 2
    one_error_line(capsys.readouterr().err, "benchmark changed since this run started", str(answers), "--restart")
    assert tree_digest(tmp_path) == before

    before = tree_digest(tmp_path, skip=(out,))
    assert run_stream(out, cache_dir, *command, "--restart") == 0
    assert tree_digest(tmp_path, skip=(out,)) == before
    assert len(summary_of(out)["stages_run"]) == ALL_STAGES
    first = json.loads((out / "mine" / "task_0" / "evaluate" / "predictions.jsonl").read_text().splitlines()[0])
    assert first["answer"] == "7"
    # the restart recorded the edited benchmark: the same command now resumes, running nothing
    assert run_stream(out, cache_dir, *command) == 0
    assert summary_of(out)["stages_run"] == []
