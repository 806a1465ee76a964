"""Every plot writes a real PNG and leaves no figure open; the Pareto front is the right set."""
import sys

import numpy as np
import pytest

from cram_ray.report import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TASKS = ["choice", "ocr", "a-rather-long-task-name"]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1000
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 50 and height > 50


@pytest.fixture(autouse=True)
def no_open_figures():
    yield
    # the writers never go through pyplot; if something imported it, nothing may be left open
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_accuracy_heatmap_ragged_and_square(tmp_path):
    ragged = [[80.0], [60.0, 90.0], [40.0, 70.0, 50.0]]
    p = plots.accuracy_heatmap(ragged, TASKS, tmp_path / "sub" / "acc.png", title="cram")
    assert p == tmp_path / "sub" / "acc.png"
    assert_png(p)
    square = np.array([[0.8, np.nan, np.nan], [0.6, 0.9, np.nan], [0.4, 0.7, 0.5]])
    assert_png(plots.accuracy_heatmap(square, TASKS, tmp_path / "acc01.png"))
    with pytest.raises(ValueError, match="3 task names"):
        plots.accuracy_heatmap(ragged, TASKS[:2], tmp_path / "bad.png")


def test_rank_map_from_dict_array_and_per_task_dicts(tmp_path):
    per_task = [{"l0.q_proj": 4, "l0.v_proj": 2}, {"l0.q_proj": 8, "l0.v_proj": 3}, {"l0.q_proj": 2}]
    by_layer = plots.ranks_by_layer(per_task)
    assert by_layer["l0.q_proj"] == [4.0, 8.0, 2.0]
    assert by_layer["l0.v_proj"][:2] == [2.0, 3.0] and np.isnan(by_layer["l0.v_proj"][2])
    assert_png(plots.rank_map(by_layer, tmp_path / "ranks.png", task_names=TASKS))
    arr = np.array([[4, 8, 2], [2, 3, 5]])
    assert_png(plots.rank_map(arr, tmp_path / "ranks_arr.png", layer_names=["a", "b"]))
    with pytest.raises(ValueError, match="layer names"):
        plots.rank_map(arr, tmp_path / "bad.png", layer_names=["a"])


def test_routing_confusion(tmp_path):
    conf = [[18, 2, 0], [1, 15, 4], [0, 0, 20]]
    assert_png(plots.routing_confusion(conf, TASKS, tmp_path / "conf.png"))
    # an evaluation row of a task with no samples must not divide by zero
    assert_png(plots.routing_confusion([[0, 0, 0], [1, 1, 0], [0, 0, 3]], TASKS, tmp_path / "conf0.png"))


def test_grouped_bars(tmp_path):
    table = {
        "cram": {"mft": (80.0, 2.0), "mfn": (78.0, 1.5), "bwt": (-1.0, 0.5)},
        "lora_ft": {"mft": (82.0, 1.0), "mfn": 30.0, "bwt": (-60.0, None)},
        "oracle": {"mft": (81.0, 0.0)},  # missing metrics leave gaps
    }
    assert_png(plots.grouped_bars(table, ["mft", "mfn", "bwt"], tmp_path / "bars.png"))


POINTS = [
    {"label": "a", "params": 1.0, "maa": 50.0},  # front: the cheapest
    {"label": "b", "params": 2.0, "maa": 70.0},  # front
    {"label": "c", "params": 3.0, "maa": 65.0},  # dominated by b
    {"label": "d", "params": 4.0, "maa": 90.0},  # front
    {"label": "e", "params": 4.0, "maa": 85.0},  # dominated by d (same x, lower y)
    {"label": "f", "params": 2.0, "maa": 70.0},  # duplicate of b: both kept
    {"label": "g", "params": 5.0, "maa": 90.0},  # dominated by d (same y, higher x)
    {"label": "h", "params": 0.5, "maa": 10.0},  # front: cheapest of all
]


def test_pareto_front_membership():
    front = plots.pareto_front(POINTS, "params", "maa")
    assert {POINTS[i]["label"] for i in front} == {"h", "a", "b", "f", "d"}
    assert [POINTS[i]["params"] for i in front] == sorted(POINTS[i]["params"] for i in front)
    assert plots.pareto_front([{"x": 1, "y": 1}], "x", "y") == [0]


def test_pareto_plot(tmp_path):
    assert_png(plots.pareto_plot(POINTS, "params", "maa", tmp_path / "pareto.png"))
    with pytest.raises(ValueError, match="at least one point"):
        plots.pareto_plot([], "params", "maa", tmp_path / "empty.png")


def test_plots_never_import_pyplot():
    import subprocess

    code = (
        "import sys, tempfile, pathlib; from cram_ray.report import plots; "
        "d = pathlib.Path(tempfile.mkdtemp()); plots.accuracy_heatmap([[1.0]], ['t'], d / 'a.png'); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
