"""Shared by tests/test_tuning*.py: the bounds of the trials' settings, a good config inside
them, and a check that a config is inside its bounds."""

from __future__ import annotations

BOUNDS = {"learning_rate": (2e-4, 3e-3), "batch_size": (8.0, 32.0), "warmup_ratio": (0.0, 0.1)}
GOOD = {"learning_rate": 1e-3, "batch_size": 16, "warmup_ratio": 0.05}


def _inside(config, bounds):
    return all(bounds[n][0] <= v <= bounds[n][1] for n, v in config.items())
