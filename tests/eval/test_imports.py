"""eval, report and tracking never import Ray; tracking imports mlflow only when enabled."""
import subprocess
import sys

MODULES = [
    "cram_ray.eval.scorers", "cram_ray.eval.metrics", "cram_ray.report.plots", "cram_ray.report.tables",
    "cram_ray.tracking.mlflow_tracker",
]


def test_no_ray_and_lazy_mlflow():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in MODULES)
        + "from cram_ray.config import TrackingConfig\n"
        "from cram_ray.tracking.mlflow_tracker import StreamTracker\n"
        "StreamTracker(TrackingConfig(enabled=False), '/nonexistent/never', 'r').start({'a': 1})\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
