"""Coverage: how many of the planned rows got an accepted label, per slice and in all.

    coverage = labelled rows / (planned rows - excluded rows)

A row is labelled when any agent of its slice (the first one, a retry, a top-up) had a label
for it accepted and not revoked. Excluded rows are those no agent may ever label: a row whose
text copies a held-out evaluation row (gate reason `copy_of_eval_row`), and a row whose text
addresses the agent, quarantined (`hostile_row`, agents/hostile_text.py). They are counted and
reported, not hidden. A disputed row is unlabelled after the judge rejected its label twice
(the agent re-read it and the judge still disagreed): it counts as unlabelled, and no fresh
agent is sent for it, since another would meet the same judge.

`stop_after_generation` reports a generate stage that a provider outage ended (coverage so
far, the reason, what was kept) before the run fails without training.

`check_coverage` is the pipeline's step after generation: it writes coverage.json, logs the
`coverage` metric to MLflow, and raises `CoverageError` (naming the slices and how their last
agents stopped) below `generation.min_coverage`, before anything is trained. `outcome` turns
stopped agents, failed agent tasks and unlabelled rows into the run's `warnings`.

Slices are named `<planned slice>+retryN` (a fresh agent over the rows a stopped, failed or
short agent left) and `<planned slice>+topupN` (a targeted top-up); `base_slice` maps them
back to the planned slice.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import get_run_logger

from agents.agent_types import JUDGE_DISAGREED
from agents.gates import COPY_OF_EVAL_ROW, row_key
from agents.hostile_text import HOSTILE_ROW
from flows import tracking
from flows.slicing import SliceDescriptor
from flows.spec import Spec
from flows.store import Store

EXCLUDED = (COPY_OF_EVAL_ROW, HOSTILE_ROW)
DISPUTED_AFTER = 2  # judge disagreements with an unlabelled row's labels: a fresh agent
#                     would only repeat the dispute, so it is reported, not retried


def base_slice(slice_id: str) -> str:
    return slice_id.split("+", 1)[0]


@dataclass
class SliceCoverage:
    slice_id: str
    planned: int
    labelled: int = 0
    excluded: int = 0
    disputed: int = 0
    agents: list[str] = field(default_factory=list)  # "<slice id>: <how it stopped>", in order
    done_rows: list[str] = field(default_factory=list, repr=False)  # labelled or excluded
    disputed_rows: list[str] = field(default_factory=list, repr=False)

    @property
    def missing(self) -> int:
        return max(0, self.planned - self.labelled - self.excluded)

    @property
    def retryable(self) -> int:
        """Unlabelled rows a fresh agent could still label (not disputed)."""
        return max(0, self.missing - self.disputed)

    @property
    def coverage(self) -> float:
        labelable = self.planned - self.excluded
        return 1.0 if labelable <= 0 else min(1.0, self.labelled / labelable)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("done_rows")
        d.pop("disputed_rows")
        return {**d, "missing": self.missing, "coverage": round(self.coverage, 4)}


def measure(store: Store, run_id: str, slices: list[SliceDescriptor],
            agent_results: list[dict] = ()) -> dict[str, SliceCoverage]:
    """Each planned slice's coverage from the example store (one query)."""
    out = {s.slice_id: SliceCoverage(s.slice_id, s.row_count) for s in slices}
    labelled: dict[str, set[str]] = {k: set() for k in out}
    excluded: dict[str, set[str]] = {k: set() for k in out}
    disputes: dict[str, dict[str, int]] = {k: {} for k in out}
    for slice_id, row_id, status in store.row_outcomes(run_id, (*EXCLUDED, JUDGE_DISAGREED)):
        base = base_slice(slice_id or "")
        if base not in out or row_id is None:
            continue
        key = row_key(row_id)
        if status == "accepted":
            labelled[base].add(key)
        elif status == JUDGE_DISAGREED:
            disputes[base][key] = disputes[base].get(key, 0) + 1
        else:
            excluded[base].add(key)
    for k, c in out.items():
        excluded[k] -= labelled[k]
        c.labelled, c.excluded = len(labelled[k]), len(excluded[k])
        c.done_rows = sorted(labelled[k] | excluded[k])
        c.disputed_rows = sorted(r for r, n in disputes[k].items() if n >= DISPUTED_AFTER
                                 and r not in labelled[k] and r not in excluded[k])
        c.disputed = len(c.disputed_rows)
    for r in agent_results:
        base = base_slice(r["slice_id"])
        if base in out:
            out[base].agents.append(f"{r['slice_id']}: {r['stopped_reason']}")
    return out


def totals(cov: dict[str, SliceCoverage]) -> dict:
    planned = sum(c.planned for c in cov.values())
    excluded = sum(c.excluded for c in cov.values())
    labelled = sum(c.labelled for c in cov.values())
    labelable = planned - excluded
    return {"coverage": round(labelled / labelable, 4) if labelable > 0 else 1.0,
            "planned_rows": planned, "labelled_rows": labelled, "excluded_rows": excluded,
            "unlabelled_rows": sum(c.missing for c in cov.values()),
            "disputed_rows": sum(c.disputed for c in cov.values())}


def shortfall(cov: dict[str, SliceCoverage], floor: float) -> str | None:
    """Why the run must not train (coverage under the floor), naming the slices, or None."""
    total = totals(cov)
    if total["coverage"] >= floor:
        return None
    short = sorted((c for c in cov.values() if c.missing), key=lambda c: c.coverage)
    named = "; ".join(f"{c.slice_id} {c.labelled}/{c.planned - c.excluded} "
                      f"({c.agents[-1].split(': ', 1)[-1] if c.agents else 'no agent ran'})"
                      for c in short[:10])
    more = f"; and {len(short) - 10} more slices" if len(short) > 10 else ""
    return (f"coverage {total['coverage']:.1%} is below generation.min_coverage {floor:.0%}: "
            f"{total['unlabelled_rows']} of {total['planned_rows'] - total['excluded_rows']} "
            f"rows have no accepted label. Slices short of rows (labelled/planned, how the last "
            f"agent stopped): {named}{more}")


class CoverageError(RuntimeError):
    """Too few planned rows got a label: the run stops before training on them."""


def check_coverage(spec: Spec, store: Store, run_id: str, slices: list[SliceDescriptor],
                   agent_results: list[dict], out: Path, client: MlflowClient,
                   mlflow_run_id: str) -> dict:
    """Coverage per slice and in total, logged to MLflow; below generation.min_coverage the
    run fails here, before training, naming the slices and how their agents stopped."""
    report, cov = _report(spec, store, run_id, slices, agent_results, out, client,
                          mlflow_run_id)
    short = shortfall(cov, spec.generation.min_coverage)
    if short:
        _write_stop(out, run_id, mlflow_run_id, "coverage", short, report, agent_results)
        raise CoverageError(short)
    return report


def stop_after_generation(spec: Spec, store: Store, run_id: str,
                          slices: list[SliceDescriptor], agent_results: list[dict],
                          reason: str, out: Path, client: MlflowClient,
                          mlflow_run_id: str) -> str:
    """The generate stage ended early (a provider outage): coverage so far in coverage.json
    and MLflow, the reason and what was kept in summary.json. Returns the run's one-line
    reason; the caller fails the run with it, so nothing is trained."""
    report, _ = _report(spec, store, run_id, slices, agent_results, out, client,
                        mlflow_run_id)
    message = (f"generate stopped: {reason}. {report['labelled_rows']} of "
               f"{report['planned_rows'] - report['excluded_rows']} rows were labelled "
               f"(coverage {report['coverage']:.1%}) and are kept in the example store; "
               f"nothing was trained or promoted. Run the same command again to resume.")
    _write_stop(out, run_id, mlflow_run_id, "outage", message, report, agent_results)
    client.set_tag(mlflow_run_id, "posttrain.stopped", message[:5000])
    return message


def _report(spec: Spec, store: Store, run_id: str, slices: list[SliceDescriptor],
            agent_results: list[dict], out: Path, client: MlflowClient,
            mlflow_run_id: str) -> tuple[dict, dict[str, SliceCoverage]]:
    """coverage.json, the `coverage` metric, one log line; the report and the slices'
    coverage."""
    cov = measure(store, run_id, slices, agent_results)
    report = {**totals(cov), "min_coverage": spec.generation.min_coverage,
              "slices": [c.as_dict() for c in cov.values()]}
    (out / "coverage.json").write_text(json.dumps(report, indent=2))
    client.log_artifact(mlflow_run_id, str(out / "coverage.json"))
    tracking.log_metrics(client, mlflow_run_id, {"coverage": report["coverage"],
                                                 "unlabelled_rows": report["unlabelled_rows"]})
    get_run_logger().info("coverage %.1f%%: %d of %d rows labelled (%d excluded: copies of "
                          "held-out rows, quarantined rows)", 100 * report["coverage"], report["labelled_rows"],
                          report["planned_rows"] - report["excluded_rows"],
                          report["excluded_rows"])
    return report, cov


def _write_stop(out: Path, run_id: str, mlflow_run_id: str, stopped_by: str, reason: str,
                report: dict, agent_results: list[dict]) -> None:
    """summary.json of a run that stops before training: why, and what it had."""
    (out / "summary.json").write_text(json.dumps(
        {"run_id": run_id, "mlflow_run_id": mlflow_run_id, "failed": True,
         "stopped_by": stopped_by, "reason": reason, "coverage": report["coverage"],
         "coverage_rows": {k: report[k] for k in ("planned_rows", "labelled_rows",
                                                  "excluded_rows", "unlabelled_rows")},
         "agents_stopped": {r["slice_id"]: r["stopped_reason"] for r in agent_results
                            if r["stopped_reason"] != "completed"},
         "promoted": False}, indent=2))


def outcome(summary: dict, covered: dict) -> dict:
    """What a reader must know about the data behind the model, as `warnings` (empty: a
    clean run) and `outcome` (clean | completed_with_warnings | degraded: an optional stage
    failed and the run went on without it)."""
    warnings = [f"{d['stage']} failed ({d['reason']}): {d['fallback']}"
                for d in summary.get("degraded") or ()]
    stopped = summary["agents_stopped"]
    if stopped:
        reasons = Counter(v.split(":", 1)[0] for v in stopped.values())
        warnings.append(f"{len(stopped)} agents stopped before finishing "
                        f"({', '.join(f'{k} {n}' for k, n in reasons.most_common())})"
                        f"{'; fresh agents took over their rows' if summary['agent_retries'] else ''}")
    if summary.get("hostile_rows_read"):
        warnings.append(f"{summary['hostile_rows_read']} rows read held text addressed to the "
                        f"agent (instructions, SQL or markup in the data): "
                        + ("quarantined, never labelled nor trained on"
                           if summary.get("hostile_rows_mode") == "quarantine" else
                           "shown, and their agents judged on everything after"))
    if summary["agents_failed"]:
        warnings.append(f"{len(summary['agents_failed'])} agent tasks failed: "
                        f"{', '.join(summary['agents_failed'][:10])}")
    if covered["unlabelled_rows"]:
        disputed = covered["disputed_rows"]
        warnings.append(f"{covered['unlabelled_rows']} of "
                        f"{covered['planned_rows'] - covered['excluded_rows']} planned rows "
                        f"have no label (coverage {covered['coverage']:.1%}"
                        + (f"; {disputed} of them disputed: the judge rejected the agents' "
                           "label twice" if disputed else "") + ")")
    return {"outcome": ("degraded" if summary.get("degraded") else
                        "completed_with_warnings" if warnings else "clean"),
            "warnings": warnings}
