"""The interface every task kind implements (flows/kinds/classification.py is the first).

A kind answers, for its tasks: what an agent is asked (`agent_task`), what it submits for a
row and which rules the gate checks (`answer_rule`, `near_duplicates`), who reviews it
(`judge`), what the model is trained to write for an accepted answer (`completion`), how the
accepted examples are curated (`curate`) and how DPO pairs are made (`pair_writer`), how one
model scores on the held-out rows (`score`), what a trivial answer scores there (`baseline`)
and what a judge says comparing models (`head_to_head`), which reports an evaluation leaves
(`write_reports`), how the figures read (`describe`, `compare`, `summary`), what is logged
as the run's metrics (`metrics`), and whether a candidate replaces the champion (`decide`).
Implementations: flows/kinds/classification.py, and generation.py and extraction.py on
flows/kinds/text.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from agents.answers import AnswerRule
from agents.judge import Judge, RubricJudge
from agents.text_diversity import NearDuplicates


class TaskKind(Protocol):
    name: str
    judge_skills: tuple[str, ...]  # the skills the judge role follows for this kind

    def answer_rule(self) -> AnswerRule:
        """The answer's format and the gate's rules (the submit tool's item schema too)."""

    def agent_task(self) -> dict:
        """What an agent's pinned task says beyond the description (labels; or the kind,
        instructions, rules, answer schema)."""

    def near_duplicates(self) -> NearDuplicates | None:
        """A fresh index the gate rejects near-duplicate answers with (None: no such check)."""

    def judge(self, gateway, role) -> Judge | RubricJudge:
        """The judge that reviews what agents submit, on the judge role's gateway."""

    def curate(self, kept: list[dict]) -> tuple[list[dict], dict]:
        """The kind's own curation of the accepted examples: (kept, figures)."""

    def pair_writer(self, runtime, sft_dir: Path | None, items: list[dict]):
        """What writes DPO pairs for the curated `items` (`.write(batch, agent, slice_id)`)."""

    def head_to_head(self, ev: dict, rows: list[dict], runtime) -> dict:
        """Judged comparisons of the final model with the others ({} where gold decides)."""

    def summary(self, ev: dict, dataset: dict) -> dict:
        """The run summary's figures for this kind."""

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
