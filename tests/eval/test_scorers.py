"""Every scorer on hand-written cases, tricky ones included."""
import pytest

from cram_ray.data.records import METRICS
from cram_ray.eval import scorers
from cram_ray.eval.scorers import (
    box_iou, grid_box_iou, normalize_vqa, parse_box, parse_option_letter, score, vqa_accuracy,
)


def test_every_record_metric_has_a_scorer():
    assert set(scorers.SCORERS) == set(METRICS)


def test_unknown_metric_names_it_and_the_valid_ones():
    with pytest.raises(ValueError) as err:
        score("bleu", "a", "a")
    msg = str(err.value)
    assert "'bleu'" in msg
    for name in METRICS:
        assert name in msg


@pytest.mark.parametrize("pred, ans, want", [
    ("cat", "cat", 1.0),
    ("  cat\n", "cat ", 1.0),
    ("Cat", "cat", 0.0),           # case matters
    ("cat.", "cat", 0.0),          # punctuation matters
    ("the  cat", "the cat", 0.0),  # inner whitespace matters
    ("", "", 1.0),
])
def test_exact(pred, ans, want):
    assert score("exact", pred, ans) == want


@pytest.mark.parametrize("pred, ans, want", [
    ("Paris", "paris", 1.0),
    ("Paris.", "paris", 1.0),
    ("  New   York \n", "new york", 1.0),
    ("STRASSE", "straße", 1.0),    # casefold, not lower
    ("Paris!", "paris", 0.0),      # only trailing periods go
    ("pa ris", "paris", 0.0),
    ("3.5", "3.5", 1.0),           # an inner period stays
    ("3.", "3", 1.0),
])
def test_lower_exact(pred, ans, want):
    assert score("lower_exact", pred, ans) == want


@pytest.mark.parametrize("text, letter", [
    ("B", "B"),
    ("b", "B"),
    ("B.", "B"),
    ("(B)", "B"),
    ("[C]", "C"),
    ("B) a red circle", "B"),
    ("b) a red circle", "B"),
    ("(D) blue", "D"),
    ("C. the square", "C"),
    ("A: top left", "A"),
    ("The answer is B", "B"),
    ("The answer is B.", "B"),
    ("Answer: (c)", "C"),
    ("answer: D", "D"),
    ("The correct option is E, because", "E"),
    ("I think the answer is (B)", "B"),
    ("B\nbecause it is red", "B"),
    ("B is correct", "B"),
    ("  \tD  ", "D"),
    ("the answer is a cat", None),   # an article after "answer is" is not option A
    ("e.g. red", None),             # "e." is not an option
    ("I think so", None),           # "I" as a first word is the pronoun
    ("red circle", None),
    ("", None),
    ("BC", None),
])
def test_parse_option_letter(text, letter):
    assert parse_option_letter(text) == letter


@pytest.mark.parametrize("pred, ans, want", [
    ("B", "B", 1.0),
    ("(B) red", "B", 1.0),
    ("The answer is B", "(B)", 1.0),
    ("b", "B. a red circle", 1.0),
    ("C", "B", 0.0),
    ("blue", "B", 0.0),            # no letter at all
    ("Bee", "B", 0.0),             # a word starting with B is not B
])
def test_option_letter(pred, ans, want):
    assert score("option_letter", pred, ans) == want


def test_option_letter_answer_without_letter_is_a_data_error():
    with pytest.raises(ValueError, match="no option letter"):
        score("option_letter", "B", "a red circle")


@pytest.mark.parametrize("text, norm", [
    ("Two", "2"),
    ("The Dog.", "dog"),
    ("a red ball!", "red ball"),
    ("3.5", "3.5"),
    ("1,000", "1000"),
    ("dont", "don't"),
    ("Don\u2019t", "don't"),
    ("black-and-white", "black and white"),
    ("  yes,  it is  ", "yes it is"),
    ("(none)", "0"),
    ("end.", "end"),
])
def test_normalize_vqa(text, norm):
    assert normalize_vqa(text) == norm


@pytest.mark.parametrize("pred, ans, want", [
    ("two", "2", 1.0),
    ("Two.", "2", 1.0),
    ("the dog", "dog", 1.0),
    ("dont know", "don't know", 1.0),
    ("3.5", "3.5", 1.0),
    ("35", "3.5", 0.0),            # the decimal point is kept, not dropped
    ("red", "blue|red|crimson", 1.0),
    ("green", "blue|red", 0.0),
    ("red ball", "red", 0.0),      # exact after normalisation, not containment
    ("", "", 1.0),
])
def test_vqa(pred, ans, want):
    assert score("vqa", pred, ans) == want


@pytest.mark.parametrize("pred, ans, want", [
    ("This question is unanswerable.", "unanswerable", 1.0),
    ("It is a Red Ball", "red ball", 1.0),
    ("there are three", "3", 1.0),
    ("not sure", "no", 0.0),       # whole words only
    ("ball red", "red ball", 0.0), # consecutive, in order
    ("it is blue", "red|blue", 1.0),
    ("anything", "the", 0.0),      # an answer that normalises to nothing
    ("the", "a", 1.0),
])
def test_contains(pred, ans, want):
    assert score("contains", pred, ans) == want


@pytest.mark.parametrize("text, box", [
    ("[1, 2, 3, 4]", (1, 2, 3, 4)),
    ("[1,2,3,4]", (1, 2, 3, 4)),
    ("( 1 , 2 , 3 , 4 )", (1, 2, 3, 4)),
    ("box: 1 2 3 4", (1, 2, 3, 4)),
    ("The box is [0, 0, 9, 9].", (0, 0, 9, 9)),
    ("[1.5, 2., 3, 4]", (1.5, 2.0, 3, 4)),
    ("[1, 2, 3, 4", (1, 2, 3, 4)),  # truncated generation
    ("[1, 2, 3]", None),
    ("[5, 2, 3, 4]", None),          # x2 < x1
    ("left", None),
])
def test_parse_box(text, box):
    assert parse_box(text) == box


def test_grid_box_iou_cells_are_inclusive():
    assert grid_box_iou((3, 3, 3, 3), (3, 3, 3, 3)) == 1.0          # one cell is a box of area 1
    assert grid_box_iou((0, 0, 1, 1), (1, 1, 2, 2)) == pytest.approx(1 / 7)  # share one of 4+4-1 cells
    assert grid_box_iou((0, 0, 0, 0), (1, 1, 1, 1)) == 0.0          # adjacent cells do not overlap
    # (0,0)-(3,1) covers 4x2 = 8 cells, (0,0)-(1,1) covers 4: IoU 4/8
    assert grid_box_iou((0, 0, 3, 1), (0, 0, 1, 1)) == pytest.approx(0.5)


def test_box_iou_is_continuous():
    assert box_iou((0.1, 0.1, 0.2, 0.2), (0.15, 0.15, 0.25, 0.25)) == pytest.approx(0.0025 / 0.0175)
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 5)) == pytest.approx(0.5)
    assert box_iou((3, 3, 3, 3), (3, 3, 3, 3)) == 0.0  # a point has no area
    assert box_iou((0, 0, 1, 1), (1, 1, 2, 2)) == 0.0  # touching corners do not overlap


@pytest.mark.parametrize("pred, ans, want", [
    ("[0.1, 0.1, 0.2, 0.2]", "[0.15, 0.15, 0.25, 0.25]", 0.0),  # IoU 0.14: a miss
    ("[0.1, 0.1, 0.5, 0.5]", "[0.12, 0.12, 0.5, 0.5]", 1.0),
    ("[10, 20, 110, 220]", "[10, 20, 110, 200]", 1.0),  # pixels: 0.9
    ("[0.1, 0.1, 0.2, 0.2]", "[0.5, 0.5, 0.6, 0.6]", 0.0),
])
def test_iou_continuous(pred, ans, want):
    assert score("iou", pred, ans) == want


@pytest.mark.parametrize("pred, ans, want", [
    ("[2, 2, 5, 5]", "[2, 2, 5, 5]", 1.0),
    ("(2,2,5,5)", "[2, 2, 5, 5]", 1.0),
    ("[2, 2, 5, 4]", "[2, 2, 5, 5]", 1.0),   # 12 of 16 cells: IoU 0.75
    ("[0, 0, 3, 1]", "[0, 0, 1, 1]", 0.0),   # IoU exactly 0.5 is not > 0.5
    ("[0, 0, 2, 1]", "[0, 0, 1, 1]", 1.0),   # 4 / 6
    ("[6, 6, 9, 9]", "[2, 2, 5, 5]", 0.0),
    ("somewhere left", "[2, 2, 5, 5]", 0.0),
    ("", "[2, 2, 5, 5]", 0.0),
])
def test_iou_grid(pred, ans, want):
    assert score("iou_grid", pred, ans) == want


@pytest.mark.parametrize("metric", ["iou", "iou_grid"])
def test_iou_answer_without_box_is_a_data_error(metric):
    with pytest.raises(ValueError, match="not a box"):
        score(metric, "[1, 1, 2, 2]", "top left")


@pytest.mark.parametrize("pred, answers, want", [
    ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),
    ("two", ["2"] * 2 + ["3"] * 8, 0.6),
    ("no", ["yes"] * 3 + ["no"] * 7, 1.0),      # 7 matches: every subset has >= 3
    ("maybe", ["yes"] * 10, 0.0),
    ("yes", ["yes"] * 4 + ["no"] * 6, 1.0),      # 4 matches: every subset keeps >= 3
    ("The dog.", ["dog"] + ["cat"] * 9, 0.3),   # normalised match: 9 subsets earn 1/3, over 10
    ("yes", ["yes"], 1.0),
])
def test_vqa_official_accuracy(pred, answers, want):
    assert score("vqa", pred, answers) == pytest.approx(want)
    assert vqa_accuracy(pred, answers) == pytest.approx(want)


def test_vqa_answer_list_must_not_be_empty():
    with pytest.raises(ValueError, match="empty"):
        score("vqa", "yes", [])


def test_other_metrics_take_the_best_of_a_list():
    assert score("lower_exact", "Paris", ["London", "paris."]) == 1.0
    assert score("anls", "helo", ["world", "hello"]) == pytest.approx(0.8)
    assert score("option_letter", "C", ["B", "C"]) == 1.0
    assert score("exact", "x", ["y", "z"]) == 0.0


@pytest.mark.parametrize("pred, ans, want", [
    ("hello", "hello", 1.0),
    ("Hello  World", "hello world", 1.0),
    ("helo", "hello", 0.8),             # 1 edit / 5 chars
    ("kitten", "sitting", 1 - 3 / 7),   # 3 / 7 < 0.5 kept
    ("abcd", "abef", 0.0),              # 2 / 4 = 0.5 is at the threshold: 0
    ("xyz", "hello", 0.0),
    ("", "hello", 0.0),
    ("", "", 1.0),
    ("helo", "world|hello", 0.8),        # max over alternatives
])
def test_anls(pred, ans, want):
    assert score("anls", pred, ans) == pytest.approx(want)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("pred", ["", "B", "[1, 1, 2, 2]", "two red balls", "x" * 40])
def test_scores_are_in_unit_interval(metric, pred):
    ans = {"option_letter": "B", "iou": "[1, 1, 2, 2]", "iou_grid": "[1, 1, 2, 2]"}.get(metric, "two red balls")
    s = score(metric, pred, ans)
    assert isinstance(s, float) and 0.0 <= s <= 1.0
