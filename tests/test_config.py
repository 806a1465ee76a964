"""The typed config tree: presets load, overrides are typed, bad keys fail with one clear line."""
from pathlib import Path

import pytest

from cram_ray.config import ConfigError, StreamConfig, load_config

PRESETS = sorted((Path(__file__).resolve().parents[1] / "workflows" / "configs").glob("*.yaml"))


def test_there_are_presets():
    names = {p.stem for p in PRESETS}
    assert {"tiny-cpu", "smoke"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, StreamConfig)
    # a preset round-trips through its dict form unchanged
    assert cfg.replace() == cfg


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["train.lr=1e-4", "method.cram.rank_max=6", "train.use_gpu=true",
                             "method.target_modules=[q_proj, v_proj]"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.method.cram.rank_max == 6
    assert cfg.train.use_gpu is True
    assert cfg.method.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("nope.x=1", "unknown config key 'nope'"),
        ("train.steps_per_task=abc", "'train.steps_per_task': expected an integer"),
        ("train.executor=spark", "'train.executor': expected one of 'local' | 'ray'"),
        ("method.cram.rank_min=9", "rank_min <= rank_max"),
        ("train.zero_stage=5", "train.zero_stage"),
        ("train.feature_cache_mb=-1", "train.feature_cache_mb: expected >= 0"),
        ("train.lr", "expected key.path=value"),
    ],
)
def test_bad_override_names_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps_per_task: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(path)
    path.write_text("train:\n  batch: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.batch'"):
        load_config(path)


def test_cross_field_check_on_image_size():
    with pytest.raises(ConfigError, match="model.image_size"):
        load_config(None, ["model.image_size=32"])


@pytest.mark.parametrize("value, expected", [("2", 2), ("[1, 2]", (1, 2)), ("[4, 4]", 4)])
def test_num_workers_is_a_count_or_an_elastic_range(value, expected):
    train = load_config(None, [f"train.num_workers={value}"]).train
    assert train.workers == expected
    assert (train.min_workers, train.max_workers) == (expected if isinstance(expected, tuple) else (expected, expected))


@pytest.mark.parametrize("value", ["0", "[2, 1]", "[0, 2]", "[1, 2, 3]", "[]"])
def test_bad_num_workers_names_the_key(value):
    with pytest.raises(ConfigError, match="train.num_workers"):
        load_config(None, [f"train.num_workers={value}"])
