"""cram_ray sets how torch's OpenMP threads wait before torch loads, unless the user chose."""
from __future__ import annotations

import os
import subprocess
import sys

from cram_ray import OMP_ENV, SPIN_COUNT

PROBE = "import cram_ray, os; print(os.environ.get('OMP_WAIT_POLICY', '-'), os.environ.get('GOMP_SPINCOUNT', '-'))"


def _policy(**chosen: str) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OMP_ENV}
    env.update(chosen)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    policy, spin = out.stdout.split()
    return policy, spin


def test_a_bounded_spin_unless_the_user_chose_how_threads_wait():
    assert _policy() == ("-", SPIN_COUNT)
    assert int(SPIN_COUNT) > 0
    # either variable is a choice: libgomp derives the spin count from the policy, or takes it as given
    assert _policy(OMP_WAIT_POLICY="PASSIVE") == ("PASSIVE", "-")
    assert _policy(OMP_WAIT_POLICY="ACTIVE") == ("ACTIVE", "-")
    assert _policy(GOMP_SPINCOUNT="0") == ("-", "0")


def test_every_workflow_imports_cram_ray_before_torch():
    """libgomp reads the policy once, when torch loads it: an entry point that imports torch first
    would spin regardless."""
    from pathlib import Path

    for script in sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.py")):
        imports = [line.split()[1].split(".")[0] for line in script.read_text().splitlines()
                   if line.startswith(("import ", "from ")) and not line.startswith("from __future__")]
        if "torch" in imports:
            assert "cram_ray" in imports and imports.index("cram_ray") < imports.index("torch"), script.name
