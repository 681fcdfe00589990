"""The interface every task kind implements (flows/kinds/classification.py is the first).

A kind answers, for its tasks: what an agent submits for a row and which rules the gate
checks (`answer_rule`), what the model is trained to write for an accepted answer
(`completion`), how one model scores on the held-out rows (`score`) and what a trivial
answer scores there (`baseline`), which reports an evaluation leaves (`write_reports`), how
the figures read in one line (`describe`, `compare`), what is logged as the run's metrics
(`metrics`), and whether a candidate replaces the champion (`decide`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from agents.answers import AnswerRule


class TaskKind(Protocol):
    name: str

    def answer_rule(self) -> AnswerRule:
        """The answer's format and the gate's rules (the submit tool's item schema too)."""

    def completion(self, answer: str) -> str:
        """The training completion for an accepted answer."""

    def score(self, model_dir: str | Path, rows: list[dict]) -> dict:
        """One model on the held-out `rows` (warehouse rows with the gold column)."""

    def baseline(self, rows: list[dict]) -> dict:
        """What a trivial answer scores on `rows`: figures merged into the evaluation."""

    def write_reports(self, ev: dict, rows: list[dict], eval_dir: Path) -> list[Path]:
        """Files explaining the final model's scores (logged under eval/ on the run)."""

    def describe(self, ev: dict) -> str:
        """The evaluation in one log line."""

    def compare(self, ev: dict) -> str:
        """The candidate's figure against the champion's, for a person asked to approve."""

    def metrics(self, ev: dict, dpo: dict | None) -> dict[str, float]:
        """The final model's figures, as logged on the parent run and its version."""

    def decide(self, ev: dict) -> dict:
        """The spec's promotion rule on `ev`: {promote, reason}."""
