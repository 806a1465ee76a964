"""The one line an operating-system failure becomes (cram_ray.cli.fail_cleanly), in milliseconds."""
from __future__ import annotations

import errno

import pyarrow.fs as pafs
import pytest

from cram_ray.cli import OS_ADVICE, fail_cleanly, os_error_line


def test_a_pyarrow_error_is_named_by_the_path_it_quotes(tmp_path):
    (tmp_path / "results.txt").write_text("mine")
    with pytest.raises(OSError) as info:
        pafs.LocalFileSystem().open_output_stream(str(tmp_path / "results.txt" / "summary.json"))
    assert os_error_line(info.value) == f"{tmp_path / 'results.txt' / 'summary.json'}: {OS_ADVICE[errno.ENOTDIR]}"


def test_the_earliest_failure_of_a_chain_is_the_one_named():
    """Clean-up on a full disk fails too; the line names what failed first."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/out/r/task_0/train/state.safetensors")
        except OSError:
            raise OSError(errno.EROFS, "Read-only file system", "/out/_LOCK.json")
    except OSError as err:
        line = os_error_line(err)
    assert line.startswith("/out/r/task_0/train/state.safetensors: no space left on the device")


def test_a_path_with_control_characters_stays_one_line(capsys):
    @fail_cleanly
    def main() -> int:
        raise PermissionError(errno.EACCES, "Permission denied", "/out/a\nb\x1b[31m")

    assert main() == 2
    assert capsys.readouterr().err == f"error: /out/a\\nb\\x1b[31m: {OS_ADVICE[errno.EACCES]}\n"


def test_other_os_errors_keep_their_traceback():
    @fail_cleanly
    def main() -> int:
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    with pytest.raises(ConnectionResetError):
        main()


def test_a_ray_workers_os_error_is_one_line_on_the_driver(capsys):
    """A stage task on Ray that hit a full disk reaches the driver as Ray's RayTaskError (an OSError
    subclass without the errno); the worker's own exception inside names the path."""
    from ray.exceptions import RayTaskError

    worker = OSError(errno.ENOSPC, "No space left on device", "/out/r/task_0/evaluate/predictions.jsonl")
    wrapped = RayTaskError("_stage_task", "Traceback (most recent call last): ...", worker).as_instanceof_cause()

    @fail_cleanly
    def main() -> int:
        raise wrapped

    assert main() == 2
    assert capsys.readouterr().err == f"error: /out/r/task_0/evaluate/predictions.jsonl: {OS_ADVICE[errno.ENOSPC]}\n"


def test_a_train_workers_os_error_is_found_among_its_worker_failures(capsys):
    """Ray Train reports a failed worker group with each rank's exception in ``worker_failures``."""
    from ray.train import WorkerGroupError

    @fail_cleanly
    def main() -> int:
        raise WorkerGroupError("worker group failed",
                               {0: OSError(errno.EROFS, "Read-only file system", "/out/r/train_runs/ckpt")})

    assert main() == 2
    assert capsys.readouterr().err == f"error: /out/r/train_runs/ckpt: {OS_ADVICE[errno.EROFS]}\n"


def test_any_other_failure_keeps_its_traceback():
    @fail_cleanly
    def main() -> int:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        main()
