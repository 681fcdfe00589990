"""The last stage: register the final model, decide by the spec's rule, ask a person when
the spec says so, and move the `champion` alias only when the decision says promote.

    decision = register_and_promote(run, final_dir, ev, dataset, pairs, dpo)

The version carries the run's lineage as tags (spec hash, dataset and pairs digests,
warehouse fingerprint, skills, cost, git commit) and its figures as metrics.
"""

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from agents.skills import load_skill
from flows import tracking
from flows.approval import ask_approval
from flows.champion_lock import settle_champion
from flows.kinds import kind_of
from flows.run_lifecycle import PostTrainingRun
from flows.spec import Spec
from training.registry import git_commit, register_model, version_of_run
from training.registry import promote as promote_model


def register_and_promote(run: PostTrainingRun, final_dir: Path, ev: dict, dataset: dict,
                         pairs: dict | None, dpo: dict | None) -> dict:
    """Log the final model's figures, register it with its lineage, decide and promote."""
    spec, mlflow_run_id = run.spec, run.mlflow_run_id
    metrics = kind_of(spec).metrics(ev, dpo)
    tracking.log_metrics(run.client, mlflow_run_id, metrics)
    calls = run.store.call_totals(run.id)
    version = register_once(spec, final_dir, mlflow_run_id, metrics, tags={
        "posttrain.run_id": run.id, "posttrain.spec_hash": spec.content_hash(),
        "posttrain.dataset_sha256": dataset["sha256"],
        "posttrain.data_fingerprint": run.fingerprint,
        **({"posttrain.pairs_sha256": pairs["sha256"]} if pairs else {}),
        "posttrain.stages": "sft+dpo" if dpo else "sft",
        "posttrain.cost_usd": f"{calls['cost_usd']:.4f}",
        "posttrain.skills": _skills(spec), "posttrain.git_commit": git_commit(),
        "posttrain.parent_run_id": mlflow_run_id,
    })
    # under the champion lock: the champion read again (another run may have moved it since
    # evaluate), the rule, a person's answer, the alias (flows/champion_lock.py)
    result, approval = settle_champion(
        spec, ev, out=run.out, store_url=run.store_url, mlflow_uri=run.mlflow_uri,
        decide=lambda current: decide(spec, version, current, mlflow_run_id),
        apply=lambda verdict: promote(spec, version, verdict))
    return {**result, "approval": approval}


def register_once(spec: Spec, final_dir: Path, mlflow_run_id: str, metrics: dict,
                  tags: dict) -> str:
    """`register`, once per posttrain run: a resumed run whose killed attempt had already
    registered its model (a version tagged with its `posttrain.run_id`) reuses that version."""
    name = spec.tracking.registered_model
    existing = version_of_run(name, tags["posttrain.run_id"])
    if existing is None:
        return register(spec, final_dir, mlflow_run_id, metrics, tags)
    print(f"{name} v{existing} was registered by this run before it was resumed: reused, "
          "not registered again")  # the flow logs prints
    return existing


@task(name="register-model", cache_policy=NO_CACHE)
def register(spec: Spec, final_dir: Path, mlflow_run_id: str, metrics: dict, tags: dict) -> str:
    return register_model(str(final_dir), mlflow_run_id, spec.tracking.registered_model,
                          metrics=metrics, tags=tags)


@task(name="promote", cache_policy=NO_CACHE)
def promote(spec: Spec, version: str, decision: dict) -> dict:
    """Move `champion` to `version` if `decision` says so; tag the version with the reason."""
    result = promote_model(spec.tracking.registered_model, version, decision)
    get_run_logger().info("registered %s v%s; champion %s: %s", spec.tracking.registered_model,
                          version, "moved to it" if result["promoted"] else "unchanged",
                          result["reason"])
    return {"model_version": version, **result}


def decide(spec: Spec, version: str, ev: dict, mlflow_run_id: str) -> tuple[dict, dict | None]:
    """The spec's rule on this run's held-out rows (the task kind's), then a person's answer
    when it asks one."""
    rule, kind = spec.evaluation.promotion, kind_of(spec)
    decision = kind.decide(ev)
    if not (decision["promote"] and rule.require_approval):
        return decision, None
    question = (f"Promote {spec.tracking.registered_model} v{version} to champion? "
                f"{kind.compare(ev)} on {ev['n']} held-out rows; rule: {decision['reason']}. "
                f"MLflow run {mlflow_run_id}.")
    approval = ask_approval(question, timeout_s=rule.approval_timeout_minutes * 60)
    return approval.applied_to(decision), approval.as_dict()


def _skills(spec: Spec) -> str:
    """The skills this run's agents followed, as name@version (lineage of the data)."""
    names = [spec.task.skill] + (list(kind_of(spec).judge_skills) if spec.llm.judge is not None
                                 else [])
    return ",".join(f"{n}@{load_skill(n).version}" for n in names)
