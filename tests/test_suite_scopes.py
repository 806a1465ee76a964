"""How `make test` splits the suite over its pytest processes (tests/conftest.py): a directory whose
tests share a session fixture is one scope, every other file its own, the long scopes come first,
and they name files that exist (a renamed file would silently fall back to collection order)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def load_conftest():
    spec = importlib.util.spec_from_file_location("suite_conftest", TESTS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shared_directories_are_one_scope_and_other_files_their_own():
    conf = load_conftest()
    for name in conf.SHARED_SESSION_DIRS:
        files = sorted((TESTS / name).glob("test_*.py"))
        assert len(files) >= 2, name
        assert {conf.scope_of(str(f)) for f in files} == {name}
    ray_files = sorted((TESTS / "ray").glob("test_*.py"))
    groups = [conf.scope_of(str(f)) for f in ray_files]
    assert groups == [f"ray/{f.name}" for f in ray_files]
    assert conf.scope_of(str(TESTS / "test_compare.py")) == "test_compare.py"


def test_every_long_scope_names_tests_that_exist():
    conf = load_conftest()
    for name in conf.LONG_FIRST:
        path = TESTS / name
        assert path.is_file() or (path.is_dir() and name in conf.SHARED_SESSION_DIRS), name


def test_collection_puts_the_long_scopes_first():
    args = ["test_compare.py", "serving", "test_quick_preset.py"]
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *(str(TESTS / a) for a in args)],
                         capture_output=True, text=True, cwd=TESTS.parent, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    files = list(dict.fromkeys(line.split("::")[0] for line in out.stdout.splitlines() if "::" in line))
    # LONG_FIRST order, not the command line's; every file of the three paths collected
    assert files[0] == "tests/test_quick_preset.py"
    assert files.index("tests/serving/test_serve.py") < files.index("tests/test_compare.py")
    assert set(files) == {"tests/test_compare.py", "tests/test_quick_preset.py",
                          *(f"tests/serving/{f.name}" for f in (TESTS / "serving").glob("test_*.py"))}
