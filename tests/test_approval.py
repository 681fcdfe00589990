"""A person approves (or not) a promotion in the Prefect UI: real flow runs on a real Prefect
API, paused with `wait_for_input`, answered from another thread through `resume_flow_run`
exactly as the UI's Resume form does."""

from __future__ import annotations

import threading
import time

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run

from flows.approval import Approval, ask_approval

RULE_YES = {"promote": True, "reason": "accuracy 0.910 > champion 0.900 + 0"}


def answer_when_paused(run_input: dict | None, found: dict, deadline_s: float = 60) -> None:
    """In a thread: wait for a PAUSED flow run, record the form it asks for, answer it."""
    paused = FlowRunFilter(state=FlowRunFilterState(
        type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    end = time.monotonic() + deadline_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < end:
            runs = client.read_flow_runs(flow_run_filter=paused)
            if runs:
                found["flow_run_id"] = runs[0].id
                found["state"] = runs[0].state.name
                if run_input is not None:
                    resume_flow_run(runs[0].id, run_input=run_input)
                return
            time.sleep(0.3)


@flow(name="approval-test")
def needs_approval(timeout_s: float) -> dict:
    approval = ask_approval("Promote demo v2? accuracy 0.91 vs 0.90", timeout_s=timeout_s,
                            poll_interval=1)
    return {"approval": approval.as_dict(), "decision": approval.applied_to(RULE_YES)}


def run_with_answer(run_input: dict | None, timeout_s: float = 60) -> tuple[dict, dict]:
    found: dict = {}
    helper = threading.Thread(target=answer_when_paused, args=(run_input, found))
    helper.start()
    result = needs_approval(timeout_s)
    helper.join()
    return result, found


def test_an_approved_promotion_goes_ahead(prefect_api):
    result, found = run_with_answer({"approve": True, "reviewer": "alice", "comment": "ok"})
    assert found["state"] == "Paused"  # the run really waited on the server
    assert result["approval"] == {"approved": True, "reviewer": "alice", "comment": "ok",
                                  "timed_out": False}
    assert result["decision"]["promote"] is True
    assert result["decision"]["reason"].endswith("(approved by alice)")


def test_a_rejected_promotion_keeps_the_champion(prefect_api):
    result, _ = run_with_answer({"approve": False, "reviewer": "bob", "comment": "F1 on tech"})
    assert result["decision"]["promote"] is False
    assert result["decision"]["reason"].startswith("rejected by bob: F1 on tech")
    assert RULE_YES["reason"] in result["decision"]["reason"]  # what the rule had said


def test_no_answer_in_time_is_not_an_approval(prefect_api):
    result, found = run_with_answer(None, timeout_s=3)
    assert "flow_run_id" in found  # it did pause
    assert result["approval"]["timed_out"] is True
    assert result["decision"]["promote"] is False
    assert result["decision"]["reason"].startswith("no approval before the timeout")
    with get_client(sync_client=True) as client:  # and the run went on to complete
        assert client.read_flow_run(found["flow_run_id"]).state.is_completed()


def test_a_rule_that_says_no_stays_no_whatever_the_answer():
    no = {"promote": False, "reason": "accuracy 0.880 <= champion 0.900 + 0"}
    yes = Approval(approved=True, reviewer="carol", comment="", timed_out=False)
    assert yes.applied_to(no) == no

