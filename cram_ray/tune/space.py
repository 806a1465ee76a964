"""Search spaces of a study: parsed from ``tune.search_space`` in the config, checked, applied.

A space maps dotted config keys to a distribution spec::

    method.cram.rank_max: {type: choice, values: [4, 8, 16]}
    method.cram.lambda_dec: {type: loguniform, low: 0.1, high: 10}

Types: ``choice`` (``values``), ``uniform`` / ``loguniform`` (``low``, ``high``), ``randint``
(``low``, ``high`` inclusive). An empty ``tune.search_space`` means :data:`DEFAULT_SPACE`: CRAM's
rank budget and penalty weights at the ranges the tiny model can use. Everything here is pure
Python; :func:`tune_domains` is the only function that imports Ray.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from cram_ray.config import ConfigError, StreamConfig

TYPES = ("choice", "uniform", "loguniform", "randint")

# CRAM's rank budget (buffer, floor, cap, spectral and novelty thresholds) and penalty weights
# (decoupling weight, RBF width, multi-group margin), around the tiny-scale defaults.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "method.cram.buf_rank": {"type": "choice", "values": [8, 16, 24]},
    "method.cram.rank_min": {"type": "choice", "values": [1, 2, 4]},
    "method.cram.rank_max": {"type": "choice", "values": [4, 8, 12]},
    "method.cram.tau_alloc": {"type": "loguniform", "low": 0.02, "high": 0.3},
    "method.cram.tau_novel": {"type": "uniform", "low": 0.3, "high": 0.8},
    "method.cram.lambda_dec": {"type": "loguniform", "low": 0.05, "high": 10.0},
    "method.cram.sigma": {"type": "choice", "values": [0.0, 0.5, 1.0, 2.0]},
    "method.cram.theta": {"type": "uniform", "low": 0.02, "high": 0.3},
}


@dataclass(frozen=True)
class Dimension:
    """One searched config key and its distribution."""

    key: str
    type: str
    values: Optional[tuple[Any, ...]] = None
    low: Optional[float] = None
    high: Optional[float] = None

    def contains(self, value: Any) -> bool:
        if self.type == "choice":
            return value in self.values
        assert self.low is not None and self.high is not None
        return self.low <= value <= self.high


def _dimension(key: str, spec: Any) -> Dimension:
    where = f"tune.search_space.{key}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping like {{type: choice, values: [...]}}, got {spec!r}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise ConfigError(f"{where}.type: expected one of {', '.join(TYPES)}, got {kind!r}")
    allowed = {"type", "values"} if kind == "choice" else {"type", "low", "high"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise ConfigError(f"{where}: unexpected field(s) {', '.join(extra)} for type {kind} "
                          f"(expected {', '.join(sorted(allowed))})")
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"{where}.values: expected a non-empty list, got {values!r}")
        return Dimension(key, kind, values=tuple(values))
    low, high = spec.get("low"), spec.get("high")
    for name, v in (("low", low), ("high", high)):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ConfigError(f"{where}.{name}: expected a number, got {v!r}")
    if not low < high:
        raise ConfigError(f"{where}: expected low < high, got low={low} high={high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.low: expected > 0 for loguniform, got {low}")
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{where}: expected integer low/high for randint, got {low}/{high}")
    return Dimension(key, kind, low=float(low), high=float(high))


def parse_space(cfg: StreamConfig) -> list[Dimension]:
    """The study's dimensions, each checked against the config: the key must exist and every value
    the distribution can produce must be accepted by the config's own type and range checks."""
    raw = cfg.tune.search_space or DEFAULT_SPACE
    if not isinstance(raw, Mapping):
        raise ConfigError(f"tune.search_space: expected a mapping of dotted key -> spec, got {raw!r}")
    flat = cfg.flat()
    dims = []
    for key, spec in raw.items():
        if key not in flat:
            raise ConfigError(f"tune.search_space: unknown config key '{key}'")
        if key.startswith(("tune.", "tracking.")) or key == "storage":
            raise ConfigError(f"tune.search_space: '{key}' cannot be searched (study settings, not stream ones)")
        dim = _dimension(key, spec)
        probes = list(dim.values) if dim.type == "choice" else [dim.low, dim.high]
        for value in probes:
            if dim.type == "randint":
                value = int(value)
            try:
                apply_params(cfg, {key: value})
            except ConfigError as err:
                raise ConfigError(f"tune.search_space.{key}: value {value!r} is not accepted ({err})") from None
        dims.append(dim)
    return dims


def repair(params: Mapping[str, Any]) -> dict[str, Any]:
    """Make independently sampled rank settings consistent: rank_max <= buf_rank (a layer cannot
    keep more directions than the buffer probed) and rank_min <= rank_max."""
    out = dict(params)
    pre = "method.cram."
    if not all(is_finite_number(out.get(pre + k, 0)) for k in ("buf_rank", "rank_min", "rank_max")):
        return out  # ill-typed: the config's own checks report it
    if pre + "rank_max" in out and pre + "buf_rank" in out:
        out[pre + "rank_max"] = min(out[pre + "rank_max"], out[pre + "buf_rank"])
    if pre + "rank_min" in out and pre + "rank_max" in out:
        out[pre + "rank_min"] = min(out[pre + "rank_min"], out[pre + "rank_max"])
    return out


def apply_params(cfg: StreamConfig, params: Mapping[str, Any]) -> StreamConfig:
    """``cfg`` with a trial's sampled values (after :func:`repair`, with the cfg's own values
    filling in rank settings that are not searched)."""
    flat = cfg.flat()
    pre = "method.cram."
    full = dict(params)
    if any(k.startswith(pre) for k in params):
        for name in ("buf_rank", "rank_min", "rank_max"):
            full.setdefault(pre + name, flat[pre + name])
    full = repair(full)
    changed = {k: v for k, v in full.items() if k in params or v != flat[k]}
    return cfg.replace(**changed)


def tune_domains(dims: list[Dimension]) -> dict[str, Any]:
    """Ray Tune sampling domains for ``dims`` (keys kept dotted)."""
    from ray import tune

    out: dict[str, Any] = {}
    for d in dims:
        if d.type == "choice":
            out[d.key] = tune.choice(list(d.values))
        elif d.type == "uniform":
            out[d.key] = tune.uniform(d.low, d.high)
        elif d.type == "loguniform":
            out[d.key] = tune.loguniform(d.low, d.high)
        else:
            out[d.key] = tune.randint(int(d.low), int(d.high) + 1)  # Tune's upper bound is exclusive
    return out


def describe(dims: list[Dimension]) -> str:
    """One line per dimension, for logs and the results table."""
    lines = []
    for d in dims:
        if d.type == "choice":
            lines.append(f"{d.key}: choice {list(d.values)}")
        else:
            lo, hi = d.low, d.high
            fmt = (lambda v: f"{int(v)}") if d.type == "randint" else (lambda v: f"{v:g}")
            lines.append(f"{d.key}: {d.type} [{fmt(lo)}, {fmt(hi)}]")
    return "\n".join(lines)


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
