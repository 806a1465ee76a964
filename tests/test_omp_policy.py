"""cram_ray sets torch's OpenMP wait policy before torch loads, unless the user chose one."""
from __future__ import annotations

import os
import subprocess
import sys

PROBE = "import cram_ray, os; print(os.environ['OMP_WAIT_POLICY'])"


def _policy(env_value):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_passive_unless_the_user_chose_a_policy():
    assert _policy(None) == "PASSIVE"
    assert _policy("ACTIVE") == "ACTIVE"


def test_every_workflow_imports_cram_ray_before_torch():
    """libgomp reads the policy once, when torch loads it: an entry point that imports torch first
    would spin regardless."""
    from pathlib import Path

    for script in sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.py")):
        imports = [line.split()[1].split(".")[0] for line in script.read_text().splitlines()
                   if line.startswith(("import ", "from ")) and not line.startswith("from __future__")]
        if "torch" in imports:
            assert "cram_ray" in imports and imports.index("cram_ray") < imports.index("torch"), script.name
