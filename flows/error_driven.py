"""Error-driven retraining: the champion's own errors on fresh rows decide where the agents
work first (spec `error_driven`, classification only).

    plan ─> probe ─> generate (focused) ─> ... ─> evaluate ─> summary's error map

* **Probe** (`probe`, after plan): `probe_rows` rows of every slice, chosen by a hash of the
  id (held-out rows are in no slice), at most `max_probe_rows` in all. The run's own
  sub-agents label them, gated and judged like every other row and kept as ordinary
  examples of the run (slice ids `<slice>+probe`); the champion predicts the same rows by
  greedy decoding, as evaluation does. Compared (flows/error_map.py): accuracy and error by
  slice group, per-label precision/recall/F1 against the agents' labels, the top confusion
  pairs, and the champion's `weak_labels` worst labels. Written to
  `<out>/error_map_before.json` and the parent MLflow run.
* **Focus** (`Focus`, handed to `label_rows`): the first agents go worst slice group first,
  over their slice less the rows the probe already settled; agents on the weakest groups get
  `focus_turns` x `generation.max_turns`. After the retries, a targeted top-up (`+weak`
  slices) sends agents over the still-unlabelled rows wanting only the weak labels, before
  the ordinary balance top-up.
* **Start** (`Focus.training_spec`, `start_from_champion`): the SFT fine-tunes the champion's
  own weights and tokenizer on the run's examples, so the labels and regions it already
  handles are not relearned from nothing out of a budget the focus spent elsewhere.
* **After** (flows/error_map.py `error_map_summary`): the summary's `error_map` block, the champion's map on
  the probes beside the new model's and the champion's per-label (and, where evaluation
  gives them, per-slice) figures on the held-out rows.

No champion (a first run): logged, and the run is a plain one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.task_runners import TaskRunner

from flows import coverage, tracking
from flows.agent_runners import EventLoopRunner
from flows.error_map import FocusPlan, error_map, focus_plan, probe_ids, probe_quota
from flows.generation import generate
from flows.runtime import RuntimeSettings
from flows.slicing import SliceDescriptor, only_rows, slice_members, without_rows
from flows.spec import Spec
from flows.store import Store
from training.evaluate import evaluate_classifier
from training.registry import champion_model_dir, champion_version

if TYPE_CHECKING:
    from flows.run_lifecycle import PostTrainingRun

PROBE, WEAK = "+probe", "+weak"
PROBE_SALT = "posttrain-probe:"  # the same probe rows on every run of the same warehouse


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # outside a flow (a test, a notebook)
        return logging.getLogger(__name__)


@dataclass
class Focus:
    """What an error-driven run changes in the generate stage (flows/generation.py
    `label_rows`): the probe agents' results, the first agents' order and turns, the rows the
    probe settled, and the weak-label top-up."""

    plan: FocusPlan
    emap: dict
    champion_dir: str  # the champion's weights and tokenizer, downloaded for the probe
    probe_results: list[dict] = field(default_factory=list)
    settled: dict[str, list[str]] = field(default_factory=dict)  # slice id -> probe rows done

    def training_spec(self, spec: Spec) -> Spec:
        """The spec the SFT (and tuning trials) train with: the champion's weights as the
        student when `error_driven.start_from_champion`, else `spec` unchanged."""
        if not spec.error_driven.start_from_champion:
            return spec
        student = spec.student.model_copy(update={"source": "pretrained",
                                                  "name_or_path": self.champion_dir})
        return spec.model_copy(update={"student": student})

    @property
    def max_turns(self) -> dict[str, int]:
        return self.plan.max_turns

    def first(self, slices: list[SliceDescriptor]) -> list[SliceDescriptor]:
        """The planned slices, worst group first, each less the rows the probe settled (same
        slice id: the first agent of its slice)."""
        by_id = {s.slice_id: s for s in slices}
        out = []
        for sid in self.plan.order:
            s = by_id[sid]
            if self.settled.get(sid):
                s = without_rows(s, self.settled[sid], sid)
            if s.row_count:
                out.append(s)
        return out

    def topup(self, spec: Spec, store: Store, run_id: str, slices: list[SliceDescriptor],
              settings: RuntimeSettings, progress_id: str,
              runner: TaskRunner | EventLoopRunner | None) -> list[dict]:
        """Agents over each slice's still-unlabelled rows (worst group first) that submit
        only rows of the champion's weak labels; the weakest groups keep their extra turns."""
        want = self.plan.want_labels
        if not spec.error_driven.topup or not want:
            return []
        cov = coverage.measure(store, run_id, slices)
        by_id = {s.slice_id: s for s in slices}
        jobs = [without_rows(by_id[sid], cov[sid].done_rows + cov[sid].disputed_rows,
                             f"{sid}{WEAK}") for sid in self.plan.order]
        jobs = [j for j in jobs if j.row_count > 0]
        if not jobs:
            return []
        store.add_slices(run_id, jobs)
        _logger().info("error-driven top-up for the champion's weak labels %s over %d slices",
                       ", ".join(want), len(jobs))
        return generate(jobs, settings, progress_id, spec.generation.concurrency, want,
                        runner, max_turns={j.slice_id: self.plan.max_turns[
                            coverage.base_slice(j.slice_id)] for j in jobs})


# ── the probe stage ─────────────────────────────────────────────────────────────────────────
def probe_slices(spec: Spec, slices: list[SliceDescriptor]) -> list[SliceDescriptor]:
    """Each slice restricted to its probe rows (`<slice>+probe`), within the spec's caps."""
    cfg = spec.error_driven
    quotas = probe_quota([s.row_count for s in slices], cfg.probe_rows, cfg.max_probe_rows)
    return [only_rows(s, probe_ids(slice_members(s), q, PROBE_SALT), f"{s.slice_id}{PROBE}")
            for s, q in zip(slices, quotas, strict=True) if q > 0]


def probe(run: PostTrainingRun, slices: list[SliceDescriptor], settings: RuntimeSettings
          ) -> Focus | None:
    """The probe stage: None for a plain run (error_driven off, or no champion yet)."""
    spec, log = run.spec, _logger()
    if not spec.error_driven.enabled:
        return None
    version = champion_version(spec.tracking.registered_model)
    if version is None:
        log.warning("error_driven: no champion of %s yet: this run is a plain one",
                    spec.tracking.registered_model)
        return None
    jobs = probe_slices(spec, slices)
    run.store.add_slices(run.id, jobs)
    log.info("error_driven: the agents label %d probe rows over %d slices for champion v%s",
             sum(j.row_count for j in jobs), len(jobs), version)
    results = generate(jobs, settings, run.progress.id, spec.generation.concurrency)
    probed = [e for e in run.store.accepted_examples(run.id) if e["slice_id"].endswith(PROBE)]
    champion_dir = champion_model_dir(spec.tracking.registered_model, run.out / "champion")
    if champion_dir is None:  # its alias was moved off between the two reads
        log.warning("error_driven: the champion of %s is gone: this run is a plain one",
                    spec.tracking.registered_model)
        return None
    predictions = predict_probes(spec, str(champion_dir), [e["prompt"] for e in probed])
    emap = error_map([(e["slice_id"], e["label"], p) for e, p in zip(probed, predictions,
                                                                      strict=True)],
                     spec.task.labels, spec.error_driven.weak_labels)
    plan = focus_plan([s.slice_id for s in slices], emap, spec.generation.max_turns,
                      spec.error_driven.focus_turns)
    emap |= {"champion_version": version, "probe_slices": len(jobs),
             "start_from_champion": spec.error_driven.start_from_champion,
             "probe_rows_planned": sum(j.row_count for j in jobs), "focus": plan.as_dict()}
    record(run, emap)
    cov = coverage.measure(run.store, run.id, slices)
    settled = {sid: c.done_rows + c.disputed_rows for sid, c in cov.items()}
    log.info("error_driven: champion v%s %.3f on %d probe rows; weak labels %s; worst "
             "groups first: %s", version, emap["accuracy"], emap["n"],
             ", ".join(emap["weak_labels"]) or "none", ", ".join(plan.focus_groups) or "none")
    return Focus(plan=plan, emap=emap, champion_dir=str(champion_dir), probe_results=results,
                 settled=settled)


@task(name="predict-probes", cache_policy=NO_CACHE)
def predict_probes(spec: Spec, model_dir: str, prompts: list[str]) -> list[str]:
    """The champion's label for each probe prompt: greedy decoding, the longest label its text
    starts with (training/evaluate.py, as evaluation scores it)."""
    if not prompts:
        return []
    return evaluate_classifier(model_dir, prompts, [""] * len(prompts),
                               labels=spec.task.labels,
                               max_new_tokens=spec.evaluation.max_new_tokens)["predictions"]


def record(run: PostTrainingRun, emap: dict) -> None:
    """<out>/error_map_before.json, and the champion's probe figures in the parent run."""
    path = run.out / "error_map_before.json"
    path.write_text(json.dumps(emap, indent=2))
    run.client.log_artifact(run.mlflow_run_id, str(path))
    tracking.log_metrics(run.client, run.mlflow_run_id, {
        "error_map.probe_rows": emap["n"], "error_map.champion_accuracy": emap["accuracy"],
        **{f"error_map.champion_f1.{k}": v["f1"] for k, v in emap["per_label"].items()}})
    run.client.set_tag(run.mlflow_run_id, "posttrain.weak_labels",
                       ",".join(emap["weak_labels"]) or "-")
