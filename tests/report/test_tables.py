"""Markdown output: exact content for known inputs."""
import math

import numpy as np
import pytest

from cram_ray.report.tables import format_cell, markdown_table, matrix_markdown


def test_markdown_table_content():
    rows = [
        {"method": "cram", "mft": 80.04, "bwt": (-1.25, 0.5), "params": 1200},
        {"method": "lora|ft", "mft": 82.0, "bwt": -60.0},
    ]
    md = markdown_table(rows, ["method", "mft", "bwt", "params"])
    assert md == (
        "| method | mft | bwt | params |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| cram | 80.0 | -1.2 ± 0.5 | 1200 |\n"
        "| lora\\|ft | 82.0 | -60.0 | - |\n"
    )


def test_markdown_table_floatfmt_and_odd_cells():
    md = markdown_table([{"a": 0.12345, "b": float("nan"), "c": None, "d": True, "e": np.float32(2.5)}],
                        ["a", "b", "c", "d", "e"], floatfmt=".3f")
    assert md.splitlines()[2] == "| 0.123 | - | - | True | 2.500 |"
    assert format_cell((3.0, None)) == "3.0"
    assert format_cell("two\nlines") == "two lines"
    with pytest.raises(ValueError):
        markdown_table([], [])


def test_matrix_markdown():
    md = matrix_markdown([[80.0], [60.0, 90.25], [40.0, 70.0, 50.0]], ["t0", "t1", "t2"])
    assert md == (
        "| after \\ on | t0 | t1 | t2 |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| t0 | 80.0 |  |  |\n"
        "| t1 | 60.0 | 90.2 |  |\n"
        "| t2 | 40.0 | 70.0 | 50.0 |\n"
    )
    square = np.array([[80.0, math.nan, math.nan], [60.0, 90.25, math.nan], [40.0, 70.0, 50.0]])
    assert matrix_markdown(square, ["t0", "t1", "t2"]) == md
    with pytest.raises(ValueError, match="3 task names"):
        matrix_markdown(square, ["t0"])
