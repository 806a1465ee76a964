"""The package ships every module and its console scripts reach the workflows' main functions."""
import importlib.util
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _folder(package: str) -> Path:
    """Where a listed package lives in the tree (package-dir mappings applied)."""
    mapped = PROJECT["tool"]["setuptools"]["package-dir"]
    for name, folder in mapped.items():
        if package == name or package.startswith(name + "."):
            return ROOT / folder / package[len(name):].lstrip(".").replace(".", "/")
    return ROOT / package.replace(".", "/")


def test_every_package_directory_is_listed():
    listed = set(PROJECT["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "cram_ray").rglob("__init__.py")}
    assert on_disk <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(on_disk - listed)}"
    data = PROJECT["tool"]["setuptools"]["package-data"]
    for package in listed:  # a code package has its __init__.py; a data folder has only its data
        folder = _folder(package)
        assert folder.is_dir(), package
        if not (folder / "__init__.py").is_file():
            assert package in data and not list(folder.glob("*.py")), package
            assert all(list(folder.glob(pattern)) for pattern in data[package]), (package, data[package])


def test_console_scripts_name_a_main_in_the_workflow_files():
    mapped = PROJECT["tool"]["setuptools"]["package-dir"]
    scripts = PROJECT["project"]["scripts"]
    assert set(scripts) == {"cram-stream", "cram-compare", "cram-tune", "cram-prepare", "cram-bench", "cram-predict",
                            "cram-serve"}
    for target in scripts.values():
        module, func = target.split(":")
        package, name = module.rsplit(".", 1)
        path = ROOT / mapped[package] / f"{name}.py"
        spec = importlib.util.spec_from_file_location(module, path)
        source = Path(spec.origin).read_text()
        assert f"\ndef {func}(argv" in source, (target, path)


def test_extras_install_everything_for_development():
    extras = PROJECT["project"]["optional-dependencies"]
    assert "cram_ray[all]" in extras["dev"]
    assert set(extras) >= {"ray", "deepspeed", "tune", "builtin", "serve", "all", "dev"}
    assert "cram_ray[ray,deepspeed,tune,builtin,serve]" in extras["all"]


def test_a_missing_optional_dependency_names_its_extra(capsys):
    import importlib.metadata as md

    import pytest

    from cram_ray.cli import EXTRA_OF_MODULE, fail_cleanly

    extras = PROJECT["project"]["optional-dependencies"]
    dists = md.packages_distributions()
    for module, extra in EXTRA_OF_MODULE.items():
        wanted = {d.lower().replace("_", "-") for d in dists[module]}
        declared = {req.split("[")[0].split(">")[0].split(";")[0].strip().lower().replace("_", "-")
                    for req in extras[extra]}
        assert wanted & declared, (module, extra, wanted, declared)

    @fail_cleanly
    def needs(name):
        raise ModuleNotFoundError(f"No module named '{name}'", name=name)

    assert needs("sklearn.datasets") == 2
    assert "pip install 'cram_ray[builtin]'" in capsys.readouterr().err
    with pytest.raises(ModuleNotFoundError):
        needs("something_else")
