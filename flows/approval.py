"""A person approves a promotion in the Prefect UI before the `champion` alias moves.

    approval = ask_approval("Promote news-topics v3? accuracy 0.91 vs champion 0.90 ...",
                            timeout_s=3600)
    decision = approval.applied_to(decision)   # {"promote", "reason"} from decide_promotion

The flow run pauses (Prefect `pause_flow_run(wait_for_input=...)`); the UI shows the question
as the form's description and a form for `PromotionApproval`; "Resume" with approve ticked
moves on. No answer within the timeout counts as not approved: the flow run is set running
again, the model stays registered, the alias stays where it was, and the reason says so.
Must be called from the flow's own body (not inside a task).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Running
from pydantic import Field


class PromotionApproval(RunInput):
    approve: bool = Field(description="Move the champion alias to this model version?")
    reviewer: str = Field("", description="Who decides (kept on the model version).")
    comment: str = Field("", description="Why, for the record.")


@dataclass
class Approval:
    approved: bool
    reviewer: str
    comment: str
    timed_out: bool

    def applied_to(self, decision: dict) -> dict:
        """The promotion decision after this answer: a rule's yes stays yes only if approved."""
        if not decision["promote"]:
            return decision
        if self.approved:
            return {**decision,
                    "reason": f"{decision['reason']} (approved by {self.reviewer or 'a reviewer'})"}
        if self.timed_out:
            why = "no approval before the timeout"
        else:
            why = f"rejected by {self.reviewer or 'a reviewer'}"
            why += f": {self.comment}" if self.comment else ""
        return {"promote": False, "reason": f"{why} (rule said: {decision['reason']})"}

    def as_dict(self) -> dict:
        return asdict(self)


def ask_approval(question: str, timeout_s: float, poll_interval: int | None = None) -> Approval:
    """Pause this flow run until a person answers `PromotionApproval` in the Prefect UI."""
    logger = get_run_logger()
    logger.info("Waiting for approval in the Prefect UI (flow run > Resume): %s", question)
    form = PromotionApproval.with_initial_data(description=question, approve=False)
    timeout = max(1, int(timeout_s))
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=timeout,
                                poll_interval=poll_interval or min(10, max(1, timeout // 4)))
    except FlowPauseTimeout:
        _resume_self()
        logger.warning("No approval within %d s: the champion alias stays.", timeout)
        return Approval(approved=False, reviewer="", comment="", timed_out=True)
    logger.info("Approval answer: approve=%s by %r: %s", answer.approve, answer.reviewer,
                answer.comment)
    return Approval(approved=answer.approve, reviewer=answer.reviewer,
                    comment=answer.comment, timed_out=False)


def _resume_self() -> None:
    """A pause that timed out leaves the run PAUSED on the server; this run goes on."""
    context = FlowRunContext.get()
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(context.flow_run.id, Running(), force=True)
