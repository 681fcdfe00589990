"""Optional stages degrade a run instead of failing it (docs/RELIABILITY.md).

Tuning and preference training (pairs + DPO) improve on a model the run already has. When one
of them fails, or DPO is stopped as degenerate, the run goes on with what it had (the default
config, the SFT model), and says so: a `degraded` entry in summary.json, a warning on the
summary page and the model card, and the flow run's state `Degraded`. A stage marked
`required: true` in the spec fails the run as before.

    optional = OptionalStages()
    with optional.attempt("dpo", spec.dpo.required, "the SFT model is evaluated instead"):
        ...
    summary["degraded"] = optional.degraded
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


class OptionalStages:
    def __init__(self) -> None:
        self.degraded: list[dict] = []  # {"stage", "reason", "fallback"}, in the order met

    @contextmanager
    def attempt(self, stage: str, required: bool, fallback: str) -> Iterator[None]:
        """Run the body; when it raises and the stage is not required, record why and go on
        (the body's remaining lines are skipped, so its results keep their prior values)."""
        try:
            yield
        except Exception as e:  # any failure of an optional stage degrades the run
            if required:
                raise
            reason = one_line(e)
            _logger().error("%s failed: %s. The stage is optional (%s.required: false): %s.",
                            stage, reason, stage, fallback)
            self.degraded.append({"stage": stage, "reason": reason, "fallback": fallback})


def one_line(error: BaseException) -> str:
    """The error's type and first line (a training job's own `reason` when it has one)."""
    text = str(getattr(error, "reason", None) or error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)
