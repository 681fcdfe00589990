"""Reports people read: Prefect artifacts on the flow run, pictures and pages in MLflow.

    reports = publish_reports(spec, summary, out, client, mlflow_run_id, slices, balance,
                              train_result, dpo, tuned)

Called once from the flow body, after summary.json is written. It makes

* **Prefect artifacts** on the flow run (its Artifacts tab; keys start with the spec's name):
  `<name>-summary` (markdown: counts, gate rejections, tool misuse, drift alarms, cost by
  role, metrics, the promotion decision with links to the MLflow run and model version, the
  label counts by stage), `<name>-slices` (a table, one row per agent slice),
  `<name>-label-distribution` and `<name>-training-loss` (images served by the MLflow UI);
* **MLflow, parent run**: `plots/label_distribution.png`, `plots/sft_loss.png`,
  `plots/dpo.png` (DPO ran), `plots/tuning_trials.png` (tuning ran), `summary.md`,
  `model_card.md`, and the run's description (tag `mlflow.note.content`) = the summary;
* **MLflow registry**: the model version's description = the model card.

Links point at the MLflow UI at $POSTTRAIN_MLFLOW_UI_URL (default http://127.0.0.1:5000):
runs at `{ui}/#/experiments/{experiment_id}/runs/{run_id}`, files at the server's
`{ui}/get-artifact?path=...&run_uuid=...` route. Each part stands alone: one that fails is
logged as a warning and named in the result's `errors`, never raised, because the run's
training and promotion have already happened. Prefect artifacts are made only inside a flow
or task run (outside one Prefect would start a throwaway API of its own).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from mlflow.tracking import MlflowClient
from prefect import get_run_logger
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import MissingContextError

from flows import plots
from flows.spec import Spec
from flows.store import shared_store
from flows.warehouse import SliceDescriptor

UI_ENV = "POSTTRAIN_MLFLOW_UI_URL"
DEFAULT_UI = "http://127.0.0.1:5000"
TOPUP_MARK = "+topup"  # flows/generation.rebalance names a top-up slice "<slice_id>+topupN"
NOTE_TAG = "mlflow.note.content"
MAX_NOTE = 8000  # MLflow tag values (VARCHAR(8000) on servers)
MAX_VERSION_DESCRIPTION = 5000  # model version descriptions (VARCHAR(5000) on servers)
STAGE_NAMES = ("before top-up", "after top-up", "curated (after quota)")


# ── links ────────────────────────────────────────────────────────────────────────────────────
def mlflow_ui_url() -> str:
    return (os.environ.get(UI_ENV) or DEFAULT_UI).rstrip("/")


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(ui: str, name: str, version: str) -> str:
    return f"{ui}/#/models/{quote(name, safe='')}/versions/{version}"


def artifact_url(ui: str, run_id: str, path: str) -> str:
    """A run's file as the MLflow server serves it (the route its UI uses for previews)."""
    return f"{ui}/get-artifact?path={quote(path, safe='')}&run_uuid={run_id}"


def slug(name: str) -> str:
    """A Prefect artifact key part: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "posttrain"


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


def metric_series(client: MlflowClient, run_id: str | None, key: str) -> list[tuple[int, float]]:
    """A run's metric history as (step, value), by step; [] for no run or no such metric."""
    if not run_id:
        return []
    history = client.get_metric_history(run_id, key)
    return sorted((int(m.step), float(m.value)) for m in history)


# ── markdown ───────────────────────────────────────────────────────────────────────────────────
def _num(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    cells = ["---" if a == "l" else "---:" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(cells) + " |"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |"
            for r in rows]
    return out


def label_table(stages: dict[str, dict], labels: list[str]) -> list[str]:
    names = list(stages)
    extra = sorted({k for c in stages.values() for k in c} - set(labels))
    rows = [[f"`{label}`", *(stages[n].get(label, 0) for n in names)]
            for label in [*labels, *extra]]
    rows.append(["**total**", *(f"**{sum(stages[n].values())}**" for n in names)])
    return _table(["label", *names], rows)


def _decision_lines(summary: dict, links: dict) -> list[str]:
    name, version = summary["model_name"], summary["model_version"]
    verdict = ("**promoted to champion**" if summary["promoted"]
               else "**not promoted** (the champion alias stays"
               + (f" on v{summary['previous_champion_version']})"
                  if summary.get("previous_champion_version") else ")"))
    lines = [f"**{name} v{version}**: {verdict}. Reason: {summary['promotion_reason']}."]
    approval = summary.get("approval")
    if approval:
        if approval.get("timed_out"):
            lines.append("Approval: no answer before the timeout.")
        else:
            who = approval.get("reviewer") or "a reviewer"
            said = "approved" if approval.get("approved") else "rejected"
            comment = f': "{approval["comment"]}"' if approval.get("comment") else ""
            lines.append(f"Approval: {said} by {who}{comment}.")
    else:
        lines.append("Approval: none asked (the spec's rule decided).")
    lines.append(f"MLflow run: [{summary['mlflow_run_id']}]({links['run']}) · "
                 f"model version: [{name} v{version}]({links['model_version']})")
    return lines


def summary_markdown(spec: Spec, summary: dict, stages: dict[str, dict], slice_table: list[dict],
                     evaluation: dict | None, links: dict, plot_links: dict[str, str],
                     chosen_trial: int | None = None) -> str:
    """The run in one page: what people check first, first."""
    s = summary
    roles = spec.llm.roles()
    simulated = [n for n, r in roles.items() if r.simulated]
    lines = [f"# {spec.name}: post-training run {str(s['run_id'])[:8]}", ""]
    warnings = s.get("warnings") or []
    if warnings:  # what limits this run's data comes before anything else
        lines += ["**Completed with warnings:**", ""] + [f"- {w}" for w in warnings] + [""]
    lines += _decision_lines(s, links)
    lines += ["", "Teacher: " + (f"posttrain's **SIMULATED** teacher plays {', '.join(simulated)}"
                                 if simulated else "real LLMs")
              + f" ({s.get('llm', '')})." + (" Resumed after an interrupted attempt."
                                              if s.get("resumed") else "")]

    # metrics
    n_eval = s.get("eval_examples")
    lines += ["", f"## Metrics on {n_eval} held-out rows", ""]
    ev = evaluation or {}

    def f1(key: str):
        return (ev.get(key) or {}).get("macro_f1")

    rows = [["base (untrained)", _num(s.get("base_accuracy")), _num(f1("base"))],
            ["after SFT", _num(s.get("sft_accuracy")), _num(f1("sft"))],
            ["**final**" + (" (SFT + DPO)" if s.get("dpo_reward_accuracy") is not None else ""),
             f"**{_num(s.get('accuracy'))}**", f"**{_num(s.get('macro_f1'))}**"]]
    if s.get("champion_accuracy") is not None:
        rows.append([f"champion v{s.get('previous_champion_version')} (same rows)",
                     _num(s["champion_accuracy"]), _num(f1("champion"))])
    rows.append(["always the commonest label", _num(s.get("majority_baseline")), "—"])
    lines += _table(["model", "accuracy", "macro-F1"], rows)
    if s.get("dpo_reward_accuracy") is not None:
        pairs = s.get("dpo_pairs") or {}
        lines += ["", (f"DPO: reward accuracy {_num(s['dpo_reward_accuracy'])}, reward margin "
                       f"{_num(s.get('dpo_reward_margin'))} on {pairs.get('held_out', '?')} "
                       f"held-out pairs ({pairs.get('train', '?')} trained on).")]
    trials = s.get("tuning_trials") or []
    if trials:
        beats = s.get("tuning_beats_default")
        lines += ["", f"Tuning: {len(trials)} trials; "
                  + ("the chosen config beats the spec's default." if beats
                     else "the spec's default config stays."), ""]
        keys = sorted({k for t in trials for k in (t.get("config") or {})})
        lines += _table(["trial", "source", *keys, "eval loss", "status"], [
            [f"{t['trial']}" + (" **chosen**" if t["trial"] == chosen_trial else ""),
             t.get("source", ""), *(_num((t.get("config") or {}).get(k), 5) for k in keys),
             _num(t.get("eval_loss"), 4), t.get("status", "")] for t in trials],
            align="ll" + "r" * (len(keys) + 1) + "l")
    if s.get("train_loss") is not None:
        lines += ["", f"SFT train loss {_num(s['train_loss'], 4)}."]

    # data
    rejected = s.get("examples_rejected") or {}
    planned = sum(1 for r in slice_table if r["kind"] == "planned")
    lines += ["", "## Data", ""]
    rows_cov = s.get("coverage_rows") or {}
    lines += _table(["", ""], [
        ["coverage (labelled / planned rows)",
         (f"**{_num(s.get('coverage'))}** ({rows_cov.get('labelled_rows', '?')} of "
         f"{(rows_cov.get('planned_rows') or 0) - (rows_cov.get('excluded_rows') or 0)}; "
         f"{rows_cov.get('excluded_rows', 0)} copies of held-out rows excluded; "
         f"{rows_cov.get('disputed_rows', 0)} left unlabelled after two judge rejections)")],
        ["slices (agents)", (f"{planned} planned + {s.get('agent_retries', 0)} fresh agents "
         f"over left rows + {s.get('topup_slices', 0)} top-up")],
        ["examples accepted", s.get("examples_accepted")],
        ["examples rejected by the gates", sum(rejected.values())],
        ["curated for training", (f"{s.get('train_examples')} "
                                  f"({s.get('duplicates_dropped', 0)} duplicate(s), "
                                  f"{s.get('eval_copies_dropped', 0)} copy(ies) of held-out rows, "
                                  f"{s.get('quota_trimmed', 0)} trimmed by the label quota)")],
        ["agents re-anchored", s.get("reanchors", 0)],
        ["largest agent context (tokens)", s.get("max_context_tokens", 0)],
    ])
    lines += ["", "Gate rejections by reason:" if rejected else "Gate rejections: none."]
    if rejected:
        lines += [""] + _table(["reason", "count"], [[f"`{k}`", v] for k, v in rejected.items()])
    misuse = s.get("tool_misuse") or {}
    lines += ["", "Tool misuse:" if misuse else "Tool misuse: none."]
    if misuse:
        lines += [""] + _table(["kind", "count"], [[f"`{k}`", v] for k, v in misuse.items()])
    alarms = s.get("drift_alarms") or []
    lines += ["", f"Drift alarms: {len(alarms)}." if alarms else "Drift alarms: none."]
    if alarms:
        lines += [""] + _table(["slice", "at call", "time"], [
            [a.get("slice_id"), a.get("at_call"), _num(a.get("time"), 1)] for a in alarms])
    stopped = s.get("agents_stopped") or {}
    if stopped:
        lines += ["", "Agents that stopped before finishing their slice:", ""]
        lines += _table(["slice", "stopped"], [[k, v] for k, v in stopped.items()], align="ll")
    short = [c for c in s.get("coverage_by_slice") or [] if c.get("missing")]
    if short:
        lines += ["", "Slices with unlabelled rows:", ""]
        lines += _table(["slice", "labelled", "planned", "excluded", "coverage", "agents"], [
            [c["slice_id"], c["labelled"], c["planned"], c["excluded"], _num(c["coverage"]),
             "; ".join(c.get("agents") or [])] for c in short], align="lrrrrl")

    # labels
    lines += ["", "## Label distribution", ""]
    lines += label_table(stages, spec.task.labels)
    tv = [("before top-up", s.get("label_tv_before")),
          ("after top-up", s.get("label_tv_after_topup")), ("curated", s.get("label_tv_after"))]
    if any(v is not None for _, v in tv):
        target = spec.distribution.target
        lines += ["", f"Distance to the target ({target if isinstance(target, str) else 'custom'}"
                  f" shares, total variation, tolerance {spec.distribution.tolerance:g}): "
                  + ", ".join(f"{n} {_num(v)}" for n, v in tv) + "."]
    else:
        lines += ["", "No target distribution in the spec: labels measured, not balanced."]

    # cost
    by_role = s.get("cost_by_role") or {}
    lines += ["", "## Cost", ""]
    lines += _table(["role", "USD"], [*([r, f"{v:.4f}"] for r, v in by_role.items()),
                                      ["**total**", f"**{s.get('cost_usd', 0.0):.4f}**"]])
    lines += ["", f"{s.get('llm_calls', 0)} LLM calls ({s.get('llm_errors', 0)} errors, "
              f"{s.get('cache_hits', 0)} served from the call cache), "
              f"{s.get('input_tokens', 0):,} input and {s.get('output_tokens', 0):,} output "
              "tokens." + (" Simulated models are priced as the real ones they stand for."
                           if simulated else "")]

    # time and pictures
    stages_s = s.get("stage_seconds") or {}
    if stages_s:
        lines += ["", f"Time: {_num(s.get('wall_seconds'), 1)} s in all; "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in stages_s.items()) + "."]
    if plot_links:
        lines += ["", "Plots (MLflow): " + " · ".join(f"[{n}]({u})"
                                                     for n, u in plot_links.items())]
    return "\n".join(lines) + "\n"


def model_card(spec: Spec, summary: dict, evaluation: dict | None, version_tags: dict,
               dataset: dict, stages_run: list[str], train_result: dict,
               dpo_result: dict | None, tuned: dict | None, links: dict) -> str:
    """The registered model version explained: what it is for, what it learnt from, how it
    scores, why it is (or is not) the champion, and where it came from."""
    s = summary
    roles = spec.llm.roles()
    lines = [f"# Model card: {s['model_name']} v{s['model_version']}", "",
             "## Intended use", "", spec.task.description, "",
             (f"A {spec.task.kind} model: given a prompt rendered from "
              f"`{spec.slicing.table}` rows with the template below, it completes it with one "
              f"of the labels. Out of scope: other labels, and inputs unlike these prompts."), "",
             "```", spec.task.prompt_template, "```", "",
             "## Labels", "", ", ".join(f"`{x}`" for x in spec.task.labels), "",
             "## Training data", ""]
    sha = dataset.get("sha256")
    lines += [f"- {s.get('train_examples')} curated prompt/completion examples"
              + (f", {dataset['bytes']:,} bytes" if dataset.get("bytes") else "")
              + (f", sha256 `{sha}`" if sha else "") + " (`dataset/train.jsonl` on the run).",
              (f"- Written and labelled by LLM sub-agents over {s.get('slices')} slices of "
               f"`{spec.slicing.table}` (+{s.get('topup_slices', 0)} top-up); every example "
               f"passed the gates ({s.get('examples_accepted')} accepted, "
               f"{sum((s.get('examples_rejected') or {}).values())} rejected); "
               f"dropped: {s.get('duplicates_dropped', 0)} duplicate(s), "
               f"{s.get('eval_copies_dropped', 0)} copy(ies) of held-out rows."),
              "- Teacher: " + ("**SIMULATED** (posttrain's local stand-in that answers from "
                               "the gold labels with configured noise)"
                               if s.get("teacher") == "simulated" else "real LLMs") + ".",
              "- LLM roles: " + "; ".join(
                  f"{n} = {r.api}:{r.model}" + (" (simulated)" if r.simulated else "")
                  for n, r in roles.items()) + ".",
              "- Labels in the curated set: " + ", ".join(
                  f"{k} {(s.get('label_counts') or {}).get(k, 0)}" for k in spec.task.labels)
              + "."]
    lines += ["", "## Training", ""]
    student = spec.student
    tiny = student.tiny
    base = (f"a tiny {tiny.architecture} causal LM built from a config (hidden "
            f"{tiny.hidden_size} × {tiny.num_layers} layers, {tiny.num_heads} heads, BPE "
            f"vocabulary {tiny.vocab_size} trained on the curated prompts; "
            f"{train_result.get('num_parameters', '?'):,} parameters)"
            if student.source == "tiny" else f"`{student.name_or_path}`")
    lines += [f"- Base model: {base}.", f"- Stages: {' → '.join(stages_run)}."]
    if tuned:
        lines.append(f"- Tuning: {len(tuned.get('trials', []))} trials; chosen trial "
                     f"{tuned.get('chosen_trial')} (eval loss {_num(tuned.get('best_eval_loss'), 4)}"
                     f" vs default {_num(tuned.get('default_eval_loss'), 4)}).")
    config = s.get("chosen_config") or {}
    lines.append(f"- SFT: {train_result.get('steps', '?')} steps, "
                 + ", ".join(f"{k} {v}" for k, v in config.items())
                 + f"; train loss {_num(train_result.get('train_loss'), 4)}.")
    if dpo_result:
        lines.append(f"- DPO: {dpo_result.get('steps', '?')} steps on "
                     f"{dpo_result.get('n_train', '?')} pairs, beta {dpo_result.get('beta')}, "
                     f"loss {dpo_result.get('loss_type')}; held-out reward accuracy "
                     f"{_num(dpo_result.get('reward_accuracy'))}, margin "
                     f"{_num(dpo_result.get('reward_margin'))}.")
    ev = evaluation or {}
    lines += ["", f"## Evaluation on {s.get('eval_examples')} held-out rows", "",
              ("Rows chosen by a hash of their id before slicing: no agent saw them and no "
               "training example equals one."), ""]
    rows = [[name, _num((ev.get(key) or {}).get("accuracy")),
             _num((ev.get(key) or {}).get("macro_f1"))]
            for name, key in (("base", "base"), ("after SFT", "sft"), ("**this model**", "final"),
                              (f"champion v{ev.get('champion_version')}", "champion"))
            if ev.get(key)]
    if not rows:
        rows = [["**this model**", _num(s.get("accuracy")), _num(s.get("macro_f1"))]]
    lines += _table(["model", "accuracy", "macro-F1"], rows)
    per_label = (ev.get("final") or {}).get("per_label") or {}
    if per_label:
        lines += ["", "Per label (this model):", ""]
        lines += _table(["label", "precision", "recall", "F1", "support"], [
            [f"`{k}`", _num(m["precision"]), _num(m["recall"]), _num(m["f1"]), m["support"]]
            for k, m in per_label.items()])
        if (ev.get("final") or {}).get("invalid"):
            lines += ["", f"{ev['final']['invalid']} answers matched no label (counted wrong)."]
    lines += ["", "## Promotion", ""] + _decision_lines(s, links)
    lineage = {k: v for k, v in sorted(version_tags.items()) if k.startswith("posttrain.")}
    if lineage:
        lines += ["", "## Lineage", ""]
        lines += _table(["tag", "value"], [[f"`{k}`", f"`{v}`"] for k, v in lineage.items()],
                        align="ll")
    return "\n".join(lines) + "\n"


def _clip(text: str, limit: int, where: str) -> str:
    if len(text) <= limit:
        return text
    tail = f"\n\n… (cut to fit; the whole text is {where})\n"
    return text[: limit - len(tail)] + tail


# ── the entry point ────────────────────────────────────────────────────────────────────────────
def _logger():
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow or task run (tests, a notebook)
        return logging.getLogger(__name__)


def publish_reports(spec: Spec, summary: dict, out_dir: Path, mlflow_client: MlflowClient,
                    mlflow_run_id: str, slices: list[SliceDescriptor], balance: dict,
                    train_result: dict, dpo_result: dict | None, tuned: dict | None) -> dict:
    """Write the run's reports (module docstring); returns {"prefect_artifacts": {key: id},
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
    folder = out_dir / "plots"

    def log_plot(path: Path) -> str:
        client.log_artifact(mlflow_run_id, str(path), "plots")
        result["plots"].append(f"plots/{path.name}")
        return f"plots/{path.name}"

    attempt("plot label distribution", lambda: log_plot(plots.label_distribution_png(
        stages, spec.task.labels, folder / "label_distribution.png",
        title=f"{spec.name}: labels of the accepted examples by stage")))
    sft_run = train_result.get("mlflow_run_id")

    def sft_plot() -> str:
        series = {"train loss": metric_series(client, sft_run, "loss")}
        if evals := metric_series(client, sft_run, "eval_loss"):
            series["eval loss"] = evals
        return log_plot(plots.curves_png([(f"{spec.name}: SFT", "loss", series)],
                                         folder / "sft_loss.png"))

    attempt("plot SFT loss", sft_plot)
    if dpo_result:
        dpo_run = dpo_result.get("mlflow_run_id")
        attempt("plot DPO curves", lambda: log_plot(plots.curves_png([
            ("DPO loss", "loss", {
                "train loss": metric_series(client, dpo_run, "loss"),
                "held-out loss": metric_series(client, dpo_run, "eval_loss")}),
            ("DPO rewards", "reward accuracy / margin", {
                "accuracy": metric_series(client, dpo_run, "rewards/accuracies"),
                "margin": metric_series(client, dpo_run, "rewards/margins"),
                "held-out accuracy": metric_series(client, dpo_run, "eval_rewards/accuracies")}),
        ], folder / "dpo.png")))
    if tuned and tuned.get("trials"):
        chosen = tuned.get("chosen_trial")

        def trials_plot() -> str:
            names = {t["trial"]: f"trial {t['trial']} ({t.get('source', '')})"
                     + (", chosen" if t["trial"] == chosen else "") for t in tuned["trials"]}
            series = {names[t["trial"]]: metric_series(client, t.get("mlflow_run_id"), "loss")
                      for t in tuned["trials"]}
            return log_plot(plots.curves_png([("tuning trials: train loss", "loss", series)],
                                             folder / "tuning_trials.png",
                                             highlight=names.get(chosen)))

        attempt("plot tuning trials", trials_plot)
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
                       _clip(markdown, MAX_NOTE, "summary.md among the run's artifacts"))

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
        client.update_model_version(name, version, description=_clip(
            card, MAX_VERSION_DESCRIPTION, f"model_card.md on run {mlflow_run_id}"))
        result["model_card"] = str(out_dir / "model_card.md")

    attempt("model card", log_card)

    # Prefect artifacts on this flow run (skipped outside one)
    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        log.info("not in a Prefect flow run: no Prefect artifacts")
    else:
        key = slug(spec.name)
        made = result["prefect_artifacts"]

        def make(suffix: str, fn: Callable[..., object], **kwargs) -> None:
            made[f"{key}-{suffix}"] = str(fn(key=f"{key}-{suffix}", _sync=True, **kwargs))

        attempt("Prefect summary artifact", lambda: make(
            "summary", create_markdown_artifact, markdown=markdown,
            description=f"{spec.name} run {str(summary['run_id'])[:8]}: "
                        f"{summary['model_name']} v{summary['model_version']}"))
        attempt("Prefect slices artifact", lambda: make(
            "slices", create_table_artifact, table=table,
            description=f"{spec.name}: one row per agent slice"))
        for suffix, path, what in (("label-distribution", "plots/label_distribution.png",
                                    "label counts before top-up, after top-up, curated"),
                                   ("training-loss", "plots/sft_loss.png", "SFT train loss")):
            if path in result["plots"]:
                attempt(f"Prefect {suffix} artifact", lambda s=suffix, p=path, w=what: make(
                    s, create_image_artifact, image_url=artifact_url(ui, mlflow_run_id, p),
                    description=f"{spec.name}: {w} (served by the MLflow UI at {ui})"))
    log.info("reports: %d plots, %d Prefect artifacts, MLflow run %s%s", len(result["plots"]),
             len(result["prefect_artifacts"]), links["run"],
             f"; {len(errors)} failed: {'; '.join(errors)}" if errors else "")
    return result
