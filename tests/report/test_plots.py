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
    square = np.array([[80.0, np.nan, np.nan], [60.0, 90.0, np.nan], [40.0, 70.0, 50.0]])
    assert_png(plots.accuracy_heatmap(square, TASKS, tmp_path / "acc_square.png"))
    with pytest.raises(ValueError, match="3 task names"):
        plots.accuracy_heatmap(ragged, TASKS[:2], tmp_path / "bad.png")


@pytest.mark.parametrize("scores", [[[0.8], [0.5, 0.3]], [[95.0], [99.0, 100.0]]])
def test_accuracy_heatmap_colour_scale_is_always_percent(scores):
    # a 0.8% cell must be drawn dark, not like 80%: the scale never follows the data
    fig = plots.accuracy_heatmap_figure(scores, TASKS[:2])
    assert fig.axes[0].images[0].get_clim() == (0.0, 100.0)
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert format(scores[0][0], ".1f") in texts


LLAMA_MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def llama_ranks(n_layers, n_tasks):
    """{full layer name: [rank per task]} with a rank that encodes (block, module, task)."""
    return {f"model.language_model.layers.{b}.{m}": [b + 100 * k + 1000 * t for t in range(n_tasks)]
            for b in range(n_layers) for k, m in enumerate(LLAMA_MODULES)}


def test_layer_grid_rows_are_blocks_and_columns_full_module_names():
    names = list(llama_ranks(3, 1))
    rows, cols, cells = plots.layer_grid(names)
    assert rows == ["0", "1", "2"]
    assert cols == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert cells[names.index("model.language_model.layers.2.mlp.up_proj")] == (2, 5)
    # two stacks: each row names its stack; an ambiguous tail keeps the module's path
    rows, cols, _ = plots.layer_grid(["vision_model.encoder.layers.0.attn.out", "language_model.layers.0.mlp.out",
                                      "multi_modal_projector.linear_1"])
    assert rows == ["vision_model 0", "language_model 0", "multi_modal_projector"]
    assert cols == ["attn.out", "mlp.out", "linear_1"]


def test_rank_map_places_every_rank_in_its_cell_and_stays_readable_at_32_layers(tmp_path):
    ranks = llama_ranks(32, 8)
    fig = plots.rank_map_figure(ranks, task_names=[f"task{t}" for t in range(8)])
    panels = [ax for ax in fig.axes if ax.images and ax.get_title().startswith("task")]
    assert [ax.get_title() for ax in panels] == [f"task{t}" for t in range(8)]
    for t, ax in enumerate(panels):
        grid = ax.images[0].get_array()
        assert grid.shape == (32, 7)
        assert grid[31, 6] == 31 + 600 + 1000 * t and grid[0, 0] == 1000 * t
        assert [lab.get_text() for lab in ax.get_xticklabels()][:4] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert [lab.get_text() for lab in panels[0].get_yticklabels()] == [str(b) for b in range(32)]
    width, height = fig.get_size_inches() * fig.dpi
    assert width <= 2000 and height <= 2000, (width, height)
    assert_png(plots.rank_map(ranks, tmp_path / "ranks32.png", task_names=[f"task{t}" for t in range(8)]))


def test_rank_map_from_dict_array_and_per_task_dicts(tmp_path):
    per_task = [{"l.0.q_proj": 4, "l.0.v_proj": 2}, {"l.0.q_proj": 8, "l.0.v_proj": 3}, {"l.0.q_proj": 2}]
    by_layer = plots.ranks_by_layer(per_task)
    assert by_layer["l.0.q_proj"] == [4.0, 8.0, 2.0]
    assert by_layer["l.0.v_proj"][:2] == [2.0, 3.0] and np.isnan(by_layer["l.0.v_proj"][2])
    fig = plots.rank_map_figure(by_layer, task_names=TASKS)
    assert np.ma.is_masked(fig.axes[2].images[0].get_array()[0, 1])  # the third task added no v_proj expert
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


def test_pareto_labels_are_the_ids_given_and_x_labels_do_not_overlap():
    # Tune trial ids as the study table prints them, parameter counts in the millions
    points = [{"label": f"8f3a2_{i:05d}", "params added": 1_234_567 + 987_654 * i, "maa": 50.0 + i}
              for i in range(12)]
    fig = plots.pareto_plot_figure(points, "params added", "maa")
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == sorted(p["label"] for p in points)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    boxes = [lab.get_window_extent(renderer) for lab in ax.get_xticklabels()
             if lab.get_text() and lab.get_visible()]
    assert len(boxes) >= 2
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 < right.x0, [lab.get_text() for lab in ax.get_xticklabels()]


def test_plots_never_import_pyplot():
    import subprocess

    code = (
        "import sys, tempfile, pathlib; from cram_ray.report import plots; "
        "d = pathlib.Path(tempfile.mkdtemp()); plots.accuracy_heatmap([[1.0]], ['t'], d / 'a.png'); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
