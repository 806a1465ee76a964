"""cram_ray/models stays below the orchestration line: no module of it imports Ray."""
import ast
from pathlib import Path

import cram_ray.models


def test_no_ray_import_in_models():
    root = Path(cram_ray.models.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert not offenders
