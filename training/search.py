"""The seeded search behind the tune stage: Optuna asked for k training configs in the bounds.

    configs = suggest(k=3, bounds={"learning_rate": (2e-4, 3e-3), "batch_size": (8, 32)},
                      past_trials=[{"config": {...}, "eval_loss": 1.9}], seed=0)

It is what proposes trials when no tuner LLM is configured, and what fills the places a tuner
left empty (a failed call, too few valid proposals). Past trials (their configs and eval
losses) are told to the study first, so with enough history the TPE sampler searches near
what worked (before `n_startup_trials` it draws at random, seeded). The learning rate is
searched on a log scale; `batch_size` and `lora_r` are integers. The same seed, bounds and
past trials give the same configs. Nothing here knows about Prefect or MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution

optuna.logging.set_verbosity(optuna.logging.WARNING)

TUNABLE = ("learning_rate", "batch_size", "warmup_ratio", "lora_r")
INTEGER = frozenset({"batch_size", "lora_r"})
LOG_SCALE = frozenset({"learning_rate"})


def config_key(config: Mapping[str, float]) -> tuple:
    """What makes two configs the same trial: each value to 6 significant digits."""
    return tuple(sorted((k, float(f"{float(v):.6g}")) for k, v in config.items()))


def distributions(bounds: Mapping[str, tuple[float, float]]) -> dict[str, BaseDistribution]:
    """One Optuna distribution per bounded setting (log scale for the learning rate)."""
    out: dict[str, BaseDistribution] = {}
    for name, (low, high) in sorted(bounds.items()):
        if name not in TUNABLE:
            raise ValueError(f"bounds.{name}: not a tunable setting; use one of {TUNABLE}")
        if low > high:
            raise ValueError(f"bounds.{name}: low {low:g} is above high {high:g}")
        if name in INTEGER:
            lo, hi = math.ceil(low), math.floor(high)
            if lo > hi:
                raise ValueError(f"bounds.{name}: no integer between {low:g} and {high:g}")
            out[name] = IntDistribution(lo, hi)
        else:
            out[name] = FloatDistribution(float(low), float(high),
                                          log=name in LOG_SCALE and low > 0)
    return out


def _inside(dist: BaseDistribution, value: float) -> float | int:
    value = min(max(value, dist.low), dist.high)
    return round(value) if isinstance(dist, IntDistribution) else float(value)


def suggest(k: int, bounds: Mapping[str, tuple[float, float]],
            past_trials: Iterable[Mapping] = (), seed: int = 0,
            exclude: Iterable[Mapping[str, float]] = (), max_draws: int | None = None,
            ) -> list[dict]:
    """Up to `k` new configs (each with every bounded name), none equal to a past trial, to
    `exclude` or to each other. Past trials are `{"config": {...}, "eval_loss": float}`;
    those without a finite eval loss or missing a bounded setting are not told. Fewer than
    `k` come back only when the box holds fewer distinct configs than `max_draws` found."""
    if k <= 0:
        return []
    dists = distributions(bounds)
    study = optuna.create_study(direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    seen = {config_key(c) for c in exclude}
    for past in past_trials:
        config, loss = past.get("config") or {}, past.get("eval_loss")
        if not isinstance(loss, int | float) or not math.isfinite(loss):
            continue
        if not all(isinstance(config.get(n), int | float) for n in dists):
            continue
        params = {n: _inside(d, float(config[n])) for n, d in dists.items()}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists,
                                                  value=float(loss)))
        seen.add(config_key({n: config[n] for n in dists}))
    out: list[dict] = []
    for _ in range(max_draws or 20 * k):
        if len(out) == k:
            break
        trial = study.ask(dists)
        # left RUNNING (asked, not trained): TPE ignores running trials, so they bias nothing
        config = {n: _inside(dists[n], v if n in INTEGER else float(f"{v:.6g}"))
                  for n, v in trial.params.items()}
        if config_key(config) in seen:
            continue
        seen.add(config_key(config))
        out.append(config)
    return out
