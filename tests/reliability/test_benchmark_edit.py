"""A user's benchmark edited between two runs of the same command: the resume refuses in one line
naming the edited file, ``--restart`` reruns from the data stage, and no run writes anywhere but
``--out`` and the cache (not the working directory, HOME or the temporary directory)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from reliability_util import one_error_line, run_stream, summary_of, tiny_builtin, tree_digest

from cram_ray.data.builtin import generate_builtin

ALL_STAGES = 15


def outside(root: Path, out: Path) -> dict[str, str]:
    """The digest of ``root`` but ``out``. Importing transformers makes torch create an empty
    ``torchinductor_<user>`` folder in the temporary directory; it must stay empty."""
    inductor = tuple((root / "tmp").glob("torchinductor_*"))
    assert not any(p.is_file() for d in inductor for p in d.rglob("*"))
    return tree_digest(root, skip=(out, *inductor))


def test_an_edited_answer_file_refuses_the_resume_and_restart_reruns_it(tmp_path, cache_dir, monkeypatch, capsys):
    home, cwd, tmp, runs = tmp_path / "home", tmp_path / "cwd", tmp_path / "tmp", tmp_path / "runs"
    for folder in (home, cwd, tmp, runs):
        folder.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.chdir(cwd)
    manifest = generate_builtin(tiny_builtin(), tmp_path / "bench")
    out = runs / "out"
    command = ["--benchmark", str(manifest), "--run-id", "mine"]

    before = outside(tmp_path, out)
    assert run_stream(out, cache_dir, *command) == 0
    assert outside(tmp_path, out) == before

    answers = manifest.parent / "instructions" / "count" / "test.json"
    records = json.loads(answers.read_text())
    records[0]["conversations"][1]["value"] = "7"
    answers.write_text(json.dumps(records))
    before, run = outside(tmp_path, out), tree_digest(out)
    capsys.readouterr()
    assert run_stream(out, cache_dir, *command) == 2
    one_error_line(capsys.readouterr().err, "benchmark changed since this run started", str(answers), "--restart")
    assert outside(tmp_path, out) == before and tree_digest(out) == run

    assert run_stream(out, cache_dir, *command, "--restart") == 0
    assert outside(tmp_path, out) == before
    assert len(summary_of(out)["stages_run"]) == ALL_STAGES
    first = json.loads((out / "mine" / "task_0" / "evaluate" / "predictions.jsonl").read_text().splitlines()[0])
    assert first["answer"] == "7"
    # the restart recorded the edited benchmark: the same command now resumes, running nothing
    assert run_stream(out, cache_dir, *command) == 0
    assert summary_of(out)["stages_run"] == []
