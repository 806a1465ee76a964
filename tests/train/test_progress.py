"""Progress lines say where a fit stands and when it ends; the loss curve is compact and exact."""
import re

from cram_ray.train.progress import StepProgress, compact_curve, duration, task_prefix


def test_duration_and_prefix():
    assert [duration(s) for s in (9, 75, 130, 3725)] == ["9s", "1m15s", "2m10s", "1h02m"]
    assert duration(float("nan")) == "?"
    assert task_prefix(2, 8, "ocr") == "[task 3/8 ocr]"


def test_compact_curve_keeps_every_step_when_short_and_bucket_means_when_long():
    assert compact_curve([1, 2, 3], [3.0, 2.0, 1.0]) == {"step": [1, 2, 3], "loss": [3.0, 2.0, 1.0]}
    steps = list(range(1, 1001))
    curve = compact_curve(steps, [float(s) for s in steps], max_points=200)
    assert len(curve["step"]) == 200 and curve["step"][-1] == 1000
    assert curve["step"][:2] == [5, 10] and curve["loss"][0] == 3.0  # mean of steps 1..5


def test_plain_lines_every_n_steps_and_at_the_end():
    lines = []
    progress = StepProgress("train", 7, log=lines.append, every_steps=3, every_seconds=0, bar=False)
    for step in range(1, 8):
        progress.update(step, {"ce": 1.0 / step, "dec": 0.5})
    assert [re.match(r" train (\d+)/7 ", ln).group(1) for ln in lines] == ["3", "6", "7"]
    assert re.fullmatch(r" train 3/7 [\d.]+ it/s ETA \S+ ce=0\.3333 dec=0\.5000", lines[0])
    curve = progress.close()
    assert curve["step"] == list(range(1, 8))
    assert curve["loss"] == [1.0 / s + 0.5 for s in range(1, 8)]


def test_resumed_fit_counts_rate_from_the_resume_step():
    lines = []
    progress = StepProgress("train", 10, log=lines.append, every_steps=1, every_seconds=0, bar=False)
    progress.begin(8)
    progress.update(9, {"ce": 1.0})
    assert lines[0].startswith(" train 9/10 ") and progress.start == 8


def test_bar_mode_prints_one_closing_line():
    lines = []
    progress = StepProgress("probe", 4, log=lines.append, bar=True)
    for step in range(1, 5):
        progress.update(step, {"ce": 1.0})
    assert lines == []
    assert progress.close()["step"] == [1, 2, 3, 4]
    assert len(lines) == 1 and lines[0].startswith(" probe 4/4 in ")
