"""House rule (docs/DESIGN.md §1): the pure-torch packages never import Ray."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "cram_ray"
PURE = ("experts", "methods", "eval", "models")


def _ray_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name == "ray" or a.name.startswith("ray.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "ray" or node.module.startswith("ray."):
                found.append(node.module)
    return found


def test_the_scanner_sees_ray_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nimport ray.train\nfrom ray import tune\nfrom raylib import x\n")
    assert _ray_imports(probe) == ["ray.train", "ray"]


@pytest.mark.parametrize("package", PURE)
def test_pure_packages_do_not_import_ray(package):
    offenders = {
        str(p.relative_to(ROOT.parent)): hits
        for p in sorted((ROOT / package).rglob("*.py"))
        if (hits := _ray_imports(p))
    }
    assert not offenders, f"Ray imported below the orchestration line: {offenders}"
