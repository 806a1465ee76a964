"""Search-space parsing, repair and the objective: pure Python, no Ray."""
import pytest

from cram_ray.config import ConfigError, load_config
from cram_ray.report.tables import markdown_table
from cram_ray.tune.objective import OBJECTIVE, check_metric, objective, results_csv
from cram_ray.tune.space import DEFAULT_SPACE, apply_params, parse_space, repair


def cfg_with(space, **over):
    sets = [f"{k}={v}" for k, v in over.items()]
    cfg = load_config("workflows/configs/smoke.yaml", sets)
    return cfg.replace(**{"tune.search_space": space})


def test_default_space_is_cram_budget_and_penalties():
    dims = parse_space(cfg_with({}))
    keys = {d.key for d in dims}
    assert keys == set(DEFAULT_SPACE)
    for name in ("buf_rank", "rank_min", "rank_max", "tau_alloc", "tau_novel", "lambda_dec", "sigma", "theta"):
        assert f"method.cram.{name}" in keys


def test_custom_space_parses_each_type():
    dims = parse_space(cfg_with({
        "method.cram.lambda_dec": {"type": "loguniform", "low": 0.1, "high": 10},
        "method.cram.rank_max": {"type": "choice", "values": [2, 4]},
        "train.steps_per_task": {"type": "randint", "low": 5, "high": 20},
        "method.cram.theta": {"type": "uniform", "low": 0.05, "high": 0.2},
    }))
    by = {d.key: d for d in dims}
    assert by["method.cram.rank_max"].values == (2, 4)
    assert by["method.cram.lambda_dec"].contains(1.0) and not by["method.cram.lambda_dec"].contains(11)
    assert by["train.steps_per_task"].type == "randint"


@pytest.mark.parametrize("space, needle", [
    ({"method.cram.nope": {"type": "choice", "values": [1]}}, "unknown config key 'method.cram.nope'"),
    ({"method.cram.rank_max": {"type": "normal", "values": [1]}}, "tune.search_space.method.cram.rank_max.type"),
    ({"method.cram.rank_max": {"type": "choice", "values": []}}, "non-empty list"),
    ({"method.cram.lambda_dec": {"type": "loguniform", "low": 0, "high": 1}}, "> 0 for loguniform"),
    ({"method.cram.lambda_dec": {"type": "uniform", "low": 2, "high": 1}}, "low < high"),
    ({"method.cram.rank_max": {"type": "choice", "values": ["x"]}}, "value 'x' is not accepted"),
    ({"method.cram.rank_max": {"type": "choice", "values": [2], "low": 1}}, "unexpected field(s) low"),
    ({"tune.num_samples": {"type": "choice", "values": [2]}}, "cannot be searched"),
    ({"method.cram.rank_max": [1, 2]}, "expected a mapping"),
])
def test_bad_space_is_one_line_naming_the_key(space, needle):
    with pytest.raises(ConfigError) as err:
        parse_space(cfg_with(space))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_repair_keeps_rank_order():
    fixed = repair({"method.cram.buf_rank": 8, "method.cram.rank_max": 12, "method.cram.rank_min": 10})
    assert fixed["method.cram.rank_max"] == 8
    assert fixed["method.cram.rank_min"] == 8
    untouched = {"method.cram.buf_rank": 16, "method.cram.rank_max": 8, "method.cram.rank_min": 2}
    assert repair(untouched) == untouched


def test_apply_params_uses_config_for_unsearched_ranks():
    cfg = cfg_with({})  # smoke: buf_rank 8, rank_min 1, rank_max 4
    out = apply_params(cfg, {"method.cram.rank_max": 12, "method.cram.lambda_dec": 3.0})
    assert out.method.cram.rank_max == cfg.method.cram.buf_rank  # clipped to the buffer
    assert out.method.cram.lambda_dec == 3.0
    assert out.method.cram.rank_min == cfg.method.cram.rank_min
    out2 = apply_params(cfg, {"method.cram.rank_min": 4, "method.cram.rank_max": 2})
    assert out2.method.cram.rank_min == 2 and out2.method.cram.rank_max == 2


def test_objective_budget_makes_over_budget_trials_worse_than_any_feasible_one():
    cfg = load_config(None, ["tune.param_budget=1000"])
    feasible_worst = objective({"maa": 0.0, "params_added_total": 1000}, cfg.tune)
    slightly_over = objective({"maa": 99.0, "params_added_total": 1001}, cfg.tune)
    far_over = objective({"maa": 99.0, "params_added_total": 5000}, cfg.tune)
    assert feasible_worst == 0.0
    assert far_over < slightly_over < feasible_worst
    free = load_config(None, [])
    assert objective({"maa": 42.0, "params_added_total": 10**9}, free.tune) == 42.0
    minimise = load_config(None, ["tune.metric=params_added_total", "tune.mode=min", "tune.param_budget=10"])
    assert objective({"params_added_total": 50}, minimise.tune) > objective({"params_added_total": 10}, minimise.tune)


def test_metric_must_be_a_stream_metric():
    with pytest.raises(ConfigError, match="tune.metric"):
        check_metric(load_config(None, ["tune.metric=accuracy"]).tune)
    check_metric(load_config(None, ["tune.metric=bwt"]).tune)


def test_bad_tune_settings_are_config_errors():
    for bad in ("tune.num_samples=0", "tune.reduction_factor=1", "tune.param_budget=-1"):
        with pytest.raises(ConfigError, match="tune."):
            load_config(None, [bad])


def test_tables_hold_every_row_and_column():
    rows = [{"trial": "a", OBJECTIVE: 51.25, "params_added_total": 1200},
            {"trial": "b", OBJECTIVE: None, "params_added_total": 300}]
    cols = ["trial", "params_added_total", OBJECTIVE]
    csv_lines = results_csv(rows, cols).strip().splitlines()
    assert csv_lines[0] == ",".join(cols) and len(csv_lines) == 3
    assert csv_lines[1].startswith("a,1200,51.25")
    md = markdown_table(rows, cols, ".4g", {"params_added_total": "params added"}).splitlines()
    assert md[0] == "| trial | params added | objective |"
    assert len(md) == 4 and md[2] == "| a | 1200 | 51.25 |" and md[3] == "| b | 300 | - |"
