"""`publish_reports`: gather what the run did, then make each report (see the package doc)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from flows.reports.links import artifact_url, mlflow_ui_url, model_version_url, run_url
from flows.reports.markdown import clip
from flows.reports.model_card import model_card
from flows.reports.plots import draw_run_plots
from flows.reports.prefect_artifacts import in_prefect_run, make_prefect_artifacts
from flows.reports.summary_page import summary_markdown
from flows.slicing import SliceDescriptor
from flows.spec import Spec
from flows.store import shared_store

TOPUP_MARK = "+topup"  # flows/generation.rebalance names a top-up slice "<slice_id>+topupN"
NOTE_TAG = "mlflow.note.content"
MAX_NOTE = 8000  # MLflow tag values (VARCHAR(8000) on servers)
MAX_VERSION_DESCRIPTION = 5000  # model version descriptions (VARCHAR(5000) on servers)
STAGE_NAMES = ("before top-up", "after top-up", "curated (after quota)")


# ── what the run did, gathered ─────────────────────────────────────────────────────────────────
def label_counts_by_stage(accepted: list[dict], curated: dict[str, int]) -> dict[str, dict]:
    """Accepted labels before the top-up rounds (planned slices only), after them (every
    accepted example), and in the curated training set (after dedup and the quota)."""
    labelled = [e for e in accepted if e["label"] is not None]
    before = Counter(e["label"] for e in labelled if TOPUP_MARK not in (e["slice_id"] or ""))
    after = Counter(e["label"] for e in labelled)
    return dict(zip(STAGE_NAMES, (dict(before), dict(after), dict(curated)), strict=True))


def slice_rows(store_slices: list[dict], planned: list[SliceDescriptor],
               agents_stopped: dict[str, str]) -> list[dict]:
    """One row per agent slice (planned and top-up), from the store; the planned
    descriptors alone (no agent figures) when the store has none."""
    if store_slices:
        return [{"slice": s["slice_id"],
                 "kind": "top-up" if TOPUP_MARK in s["slice_id"] else
                 "retry" if "+retry" in s["slice_id"] else "planned",
                 "rows": s["row_count"], "accepted": s["accepted"], "rejected": s["rejected"],
                 "status": s["status"], "stopped": s["stopped_reason"] or ""}
                for s in store_slices]
    return [{"slice": d.slice_id, "kind": "planned", "rows": d.row_count, "accepted": None,
             "rejected": None, "status": "unknown",
             "stopped": agents_stopped.get(d.slice_id, "")} for d in planned]


def _logger():
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow or task run (tests, a notebook)
        return logging.getLogger(__name__)


# ── the entry point ────────────────────────────────────────────────────────────────────────────
def publish_reports(spec: Spec, summary: dict, out_dir: Path, mlflow_client: MlflowClient,
                    mlflow_run_id: str, slices: list[SliceDescriptor], balance: dict,
                    train_result: dict, dpo_result: dict | None, tuned: dict | None) -> dict:
    """Write the run's reports (package doc); returns {"prefect_artifacts": {key: id},
    "plots": [MLflow paths], "summary_md", "model_card": local paths, "mlflow_run_url",
    "model_version_url", "errors": [what failed, one line each]}."""
    log = _logger()
    out_dir = Path(out_dir)
    client = mlflow_client
    errors: list[str] = []
    result: dict = {"prefect_artifacts": {}, "plots": [], "errors": errors}

    def attempt(what: str, fn: Callable[[], object]):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a failed report must not fail a promoted run
            errors.append(f"{what}: {e.__class__.__name__}: {str(e)[:300]}")
            log.warning("report %s failed: %s: %s", what, e.__class__.__name__, e)
            return None

    ui = mlflow_ui_url()
    experiment_id = client.get_run(mlflow_run_id).info.experiment_id
    links = {"run": run_url(ui, experiment_id, mlflow_run_id),
             "model_version": model_version_url(ui, summary["model_name"],
                                                str(summary["model_version"]))}
    result["mlflow_run_url"], result["model_version_url"] = links["run"], links["model_version"]

    # what the store knows: accepted labels before/after top-up, one row per agent slice
    store_url = spec.store.url or f"sqlite:///{out_dir.resolve() / 'store.db'}"
    store = shared_store(store_url)
    accepted = attempt("read accepted examples", lambda: store.accepted_examples(
        summary["run_id"])) or []
    stages = label_counts_by_stage(accepted, summary.get("label_counts") or {})
    if balance.get("tv_before") is not None and balance.get("tv_after") is not None:
        summary = {**summary, "label_tv_before": balance["tv_before"],
                   "label_tv_after_topup": balance["tv_after"]}
    table = slice_rows(attempt("read slices", lambda: store.list_slices(summary["run_id"])) or [],
                       slices, summary.get("agents_stopped") or {})
    evaluation = attempt("read eval.json", lambda: json.loads(
        (out_dir / "eval.json").read_text())) if (out_dir / "eval.json").is_file() else None

    # plots, drawn here and logged under plots/ on the parent run
    result["plots"] = draw_run_plots(client, mlflow_run_id, spec, stages, out_dir / "plots",
                                     train_result, dpo_result, tuned, attempt)
    plot_links = {p.removeprefix("plots/").removesuffix(".png").replace("_", " "):
                  artifact_url(ui, mlflow_run_id, p) for p in result["plots"]}
    if (out_dir / "eval" / "confusion_matrix.png").is_file():  # logged by the evaluate stage
        plot_links["confusion matrix"] = artifact_url(ui, mlflow_run_id,
                                                      "eval/confusion_matrix.png")

    # the summary page: a file on the run and the run's description
    markdown = summary_markdown(spec, summary, stages, table, evaluation, links, plot_links,
                                chosen_trial=tuned.get("chosen_trial") if tuned else None)
    result["summary_md"] = str(out_dir / "summary.md")

    def log_summary() -> None:
        (out_dir / "summary.md").write_text(markdown)
        client.log_artifact(mlflow_run_id, str(out_dir / "summary.md"))
        client.set_tag(mlflow_run_id, NOTE_TAG,
                       clip(markdown, MAX_NOTE, "summary.md among the run's artifacts"))

    attempt("summary.md and run description", log_summary)

    # the model card: a file on the run and the model version's description
    def log_card() -> None:
        name, version = summary["model_name"], str(summary["model_version"])
        tags = dict(client.get_model_version(name, version).tags or {})
        data = out_dir / "data" / "train.jsonl"
        dataset = {"sha256": tags.get("posttrain.dataset_sha256") or (
            hashlib.sha256(data.read_bytes()).hexdigest() if data.is_file() else None),
            "bytes": data.stat().st_size if data.is_file() else None}
        stages_run = [*(["tune"] if tuned else []), "SFT", *(["DPO"] if dpo_result else [])]
        card = model_card(spec, summary, evaluation, tags, dataset, stages_run, train_result,
                          dpo_result, tuned, links)
        (out_dir / "model_card.md").write_text(card)
        client.log_artifact(mlflow_run_id, str(out_dir / "model_card.md"))
        client.update_model_version(name, version, description=clip(
            card, MAX_VERSION_DESCRIPTION, f"model_card.md on run {mlflow_run_id}"))
        result["model_card"] = str(out_dir / "model_card.md")

    attempt("model card", log_card)

    # Prefect artifacts on this flow run (skipped outside one)
    if in_prefect_run():
        result["prefect_artifacts"] = make_prefect_artifacts(
            spec, summary, markdown, table, result["plots"], ui, mlflow_run_id, attempt)
    else:
        log.info("not in a Prefect flow run: no Prefect artifacts")
    log.info("reports: %d plots, %d Prefect artifacts, MLflow run %s%s", len(result["plots"]),
             len(result["prefect_artifacts"]), links["run"],
             f"; {len(errors)} failed: {'; '.join(errors)}" if errors else "")
    return result
