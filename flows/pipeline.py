"""The post-training flow: the table of contents, each stage one call, in order.

    spec ─> plan slices ─map─> one sub-agent per slice ─> gates ─> example store
      ─> fresh agents over rows left unlabelled ─> top-up ─> coverage floor
      (a provider outage ends generate here: reported, nothing trained, the rerun resumes)
      curate ─> tune? (mapped trials) ─> SFT ─> preference pairs + DPO? ─> evaluate
      (tune and DPO are optional: a failure there degrades the run, it does not end it)
      ─> register ─> approval? ─> champion alias

    the run's life         flows/run_lifecycle.py  pinned spec, resume, MLflow parent run
    the LLMs               flows/llm_endpoints.py  real endpoints or the simulated teacher
    plan                   flows/planning.py       slices of the warehouse, ids in the store
    probe (error-driven)   flows/error_driven.py   the champion's errors set the agents' focus
    generate               flows/generation.py     sub-agents, fresh agents, top-up rounds
    coverage floor         flows/coverage.py       labelled / planned rows, per slice
    curate                 flows/curation.py       dedup, held-out copies, label quota
    tune                   flows/tuning.py         mapped trials, the best config goes on
    train (SFT)            flows/sft.py            TRL SFT through Accelerate
    pairs, DPO             flows/preferences.py    agents' preference pairs, TRL DPO
    evaluate               flows/evaluation.py     every model on the same held-out rows
    promote                flows/promotion.py      registry, rule, approval, champion alias
    summary, reports       flows/summary.py        summary.json, MLflow, flows/reports/
    optional stages        flows/optional_stages.py  a failed tune/DPO: go on, say so

Each stage is a Prefect task (or a few) wrapping plain functions from its room: `flows/`
for data, `agents/` for the sub-agents, `training/` for learning. Prefect state carries only
small descriptors (slice ids, file paths, figures), never rows. Everything a run produces
lives under its out folder: the example store, the curated dataset, the models, logs and
summary.json; MLflow holds the parent run, a child run per training job and trial, and the
registry.
"""


# No `from __future__ import annotations` here: `flow.serve` cloudpickles this flow, and
# string annotations lose `Literal` on the way (tests/test_deploy.py checks it).
from pathlib import Path
from typing import Literal

from prefect import flow

from flows.coverage import check_coverage, stop_after_generation
from flows.curation import curate
from flows.error_driven import probe
from flows.evaluation import evaluate
from flows.generation import GenerationStopped, label_rows
from flows.llm_endpoints import llm_endpoints
from flows.optional_stages import OptionalStages
from flows.planning import plan
from flows.preferences import train_dpo, write_pairs
from flows.preview import run_preview
from flows.progress import StageClock
from flows.promotion import register_and_promote
from flows.run_lifecycle import prepare_run, skip_run, unchanged_since_champion
from flows.sft import train
from flows.summary import publish, summarise
from flows.tuning import tune


@flow(name="post-training", log_prints=True)
def post_training(
    spec_path: str = "examples/news_topics/spec.yaml",
    out_dir: str = "runs/latest",
    only_if_new_data: bool = False,
    generator_api: Literal["openai", "anthropic"] | None = None,
    generator_model: str | None = None,
    generator_endpoint: str | None = None,
    budget_usd: float | None = None,
    max_steps: int | None = None,
    preview: bool = False,
    preview_slices: int = 2,
    preview_rows: int = 25,
) -> dict:
    """Spec -> slices -> sub-agents -> gates -> store -> curate -> tune? -> SFT -> DPO? ->
    evaluate -> approval? -> registry.

    Args:
        spec_path: The spec YAML (relative to the worker's working directory).
        out_dir: Run folder: example store, datasets, models, summary.json.
        only_if_new_data: Stop early when the warehouse is unchanged since the champion was
            trained (nightly runs).
        generator_api: Override llm.generator.api (openai or anthropic wire format).
        generator_model: Override llm.generator.model, e.g. MiniMax-M2.5.
        generator_endpoint: Override llm.generator.endpoint: a base URL, or simulated.
        budget_usd: Override llm.budget.max_usd: new LLM calls stop past this cost.
        max_steps: Override training.max_steps of the final SFT.
        preview: Only plan and run a few slices' agents, each stopped after preview_rows
            verdicts, and show what they wrote (table artifact); nothing trained or
            registered. A later full run in the same out_dir gets those calls from the cache.
        preview_slices: Slices a preview runs (the largest distinct groups of the plan).
        preview_rows: Rows per previewed slice that get a verdict before its agent stops.
    """
    run = prepare_run(spec_path, out_dir, overrides={
        "llm.generator.api": generator_api, "llm.generator.model": generator_model,
        "llm.generator.endpoint": generator_endpoint, "llm.budget.max_usd": budget_usd,
        "training.max_steps": max_steps}, preview=preview)
    spec, out, stage = run.spec, run.out, StageClock(run.progress)
    if only_if_new_data and (why := unchanged_since_champion(run.client, spec, run.fingerprint)):
        return skip_run(run, why)

    with run.recorded(), llm_endpoints(spec, out) as endpoints:
        settings = run.settings(endpoints)  # what tasks need to rebuild the LLM runtime

        with stage("plan"):
            slices = plan(spec, run.store_url, run.id)
        if preview:  # a few slices' agents, capped, their examples on screen: flows/preview.py
            return run_preview(run, slices, settings, preview_slices, preview_rows)
        try:
            focus = None  # error_driven: the champion's errors on fresh rows set the focus
            if spec.error_driven.enabled:
                with stage("probe"):
                    focus = probe(run, slices, settings)
            with stage("generate", "sub-agents labelling rows",
                       sum(s.row_count for s in slices)):
                agents, balance = label_rows(spec, run.store, run.id, slices, settings,
                                             run.progress.id, focus)
        except GenerationStopped as stopped:  # a provider outage: report, train nothing
            raise GenerationStopped(stop_after_generation(
                spec, run.store, run.id, slices, stopped.results, stopped.reason, out,
                run.client, run.mlflow_run_id), stopped.results) from None
        covered = check_coverage(spec, run.store, run.id, slices, agents, out, run.client,
                                 run.mlflow_run_id)
        with stage("curate"):
            dataset = curate(spec, run.spec_path, run.store_url, run.id, out, run.mlflow_run_id)

        # an error-driven run fine-tunes the champion itself (error_driven.start_from_champion)
        train_spec = focus.training_spec(spec) if focus else spec
        tuned, optional = None, OptionalStages()  # a failed optional stage degrades the run
        if spec.tuning.enabled:  # short mapped trials; the best by validation loss goes on
            with optional.attempt("tuning", spec.tuning.required,
                                  "the final SFT used the default config"), stage("tune"):
                tuned = tune(train_spec, dataset, settings, out, run.mlflow_uri, run.mlflow_run_id,
                             run.progress.id)
        with stage("train", "training (TRL SFT via accelerate)", spec.training.max_steps):
            sft = train(train_spec, dataset, out, run.mlflow_uri, run.mlflow_run_id, run.progress.id,
                        settings=tuned["chosen_config"] if tuned else None)
        final_dir = sft_dir = Path(sft["final_dir"])

        pairs = dpo = None
        if spec.dpo.enabled:  # agents write preference pairs; DPO starts from the SFT model
            with optional.attempt("dpo", spec.dpo.required,
                                  "the SFT model was evaluated and registered instead"):
                with stage("pairs"):
                    pairs = write_pairs(spec, dataset, settings, run.store_url, run.id, out,
                                        run.mlflow_run_id, sft_dir)
                with stage("dpo", "preference training (TRL DPO via accelerate)",
                           spec.dpo.max_steps, bar_key="train"):
                    dpo = train_dpo(spec, pairs, sft_dir, out, run.mlflow_uri,
                                    run.mlflow_run_id, run.progress.id)
                final_dir = Path(dpo["final_dir"])

        with stage("evaluate"):
            ev = evaluate(spec, out, run.mlflow_run_id, final_dir, sft_dir, settings)
        with stage("promote"):
            decision = register_and_promote(run, final_dir, ev, dataset, pairs, dpo)

        summary = summarise(run, slices=slices, agents=agents, balance=balance,
                            covered=covered, dataset=dataset, sft=sft, tuned=tuned,
                            pairs=pairs, dpo=dpo, ev=ev, decision=decision,
                            stage_seconds=stage.seconds, degraded=optional.degraded,
                            error_map=focus.emap if focus else None)
        return publish(run, summary, slices=slices, balance=balance, sft=sft, dpo=dpo,
                       tuned=tuned)
