"""Register trained models in the MLflow Model Registry and move the `champion` alias.

    version = register_model("runs/x/final", run_id, "news-topics-classifier",
                             metrics={"accuracy": 0.91}, tags={"posttrain.spec_hash": "..."})
    old_dir = champion_model_dir("news-topics-classifier", "out/champion")  # None: no champion
    old = evaluate_classifier(old_dir, prompts, gold, labels) if old_dir else None
    decision = decide_promotion(new, old, metric="accuracy", min_improvement=0.0,
                                max_label_drop=0.05)
    promote("news-topics-classifier", version, decision)

Text answers are promoted on a judge's pairwise verdicts instead, read by their confidence
bound: `decide_win_rate_promotion(versus_champion, versus_base, min_rows=..., min_lower_bound=...)`.

The model is logged with `mlflow.transformers.log_model` (model + tokenizer, task
text-generation) into the given run and registered in one step; its metrics and tags become
model-version tags. The champion is judged by evaluating its own downloaded model on the
candidate's rows, never by a figure it got on other rows. The tracking URI is the caller's
(`mlflow.set_tracking_uri`).

Lineage tags the pipeline passes to `register_model` (all strings):
  posttrain.spec_hash       content hash of the spec
  posttrain.dataset_sha256  sha256 of the curated train.jsonl
  posttrain.skills          skills followed, "name@version" comma-separated
  posttrain.git_commit      `git_commit()`: the code's commit, or "unknown"
  posttrain.cost_usd        LLM spend of the run that produced the data
  posttrain.parent_run_id   the pipeline's parent MLflow run
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

CHAMPION = "champion"
EPS = 1e-9  # float noise in sums such as 0.7 + 0.1
LINEAGE_TAGS = (
    "posttrain.spec_hash",
    "posttrain.dataset_sha256",
    "posttrain.skills",
    "posttrain.git_commit",
    "posttrain.cost_usd",
    "posttrain.parent_run_id",
)


def _requirements() -> list[str]:
    """Pinned runtime requirements (skips MLflow's slow requirement inference)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "transformers", "tokenizers")]


def register_model(
    model_dir: str | Path,
    run_id: str,
    registered_name: str,
    metrics: dict | None = None,
    tags: dict | None = None,
) -> str:
    """Log the model in `model_dir` to run `run_id`, register it, and return the version.

    `metrics` (numbers) and `tags` (e.g. the lineage tags above) are stored as tags of the
    new model version."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    version_tags = {k: str(v) for k, v in (tags or {}).items()}
    version_tags |= {k: repr(float(v)) for k, v in (metrics or {}).items()}

    # The logged model belongs to the run's experiment, whatever experiment is active here.
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    logged = mlflow.initialize_logged_model(
        name="model", source_run_id=run_id, experiment_id=experiment_id
    )
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task="text-generation",
        registered_model_name=registered_name,
        pip_requirements=_requirements(),
        tags=version_tags,
        run_id=run_id,
        model_id=logged.model_id,
    )
    return str(info.registered_model_version)


def version_of_run(registered_name: str, posttrain_run_id: str) -> str | None:
    """The version of `registered_name` that posttrain run `posttrain_run_id` already
    registered (model-version tag `posttrain.run_id`), or None: a resumed run reuses it
    instead of registering a second one. The lowest, should there ever be several."""
    try:
        found = MlflowClient().search_model_versions(
            f"name = '{_quoted(registered_name)}' and "
            f"tags.`posttrain.run_id` = '{_quoted(posttrain_run_id)}'")
    except MlflowException:
        return None  # no such registered model yet
    versions = sorted(int(v.version) for v in found)
    return str(versions[0]) if versions else None


def _quoted(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


def champion_version(registered_name: str) -> str | None:
    """The version the `champion` alias points at, or None."""
    try:
        return str(MlflowClient().get_model_version_by_alias(registered_name, CHAMPION).version)
    except MlflowException:
        return None


def champion_model_dir(registered_name: str, dest: str | Path) -> Path | None:
    """Download the champion's model into `dest` and return a folder `from_pretrained` loads.

    `mlflow.transformers` stores the weights and config under `model/` and the tokenizer
    under `components/tokenizer/`; the tokenizer files are copied next to the weights.
    None when there is no champion."""
    if champion_version(registered_name) is None:
        return None
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    root = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{registered_name}@{CHAMPION}", dst_path=str(dest)
        )
    )
    model_dir = root / "model"
    tokenizer_dir = root / "components" / "tokenizer"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no model/config.json in the champion of {registered_name}")
    if tokenizer_dir.is_dir():
        for f in tokenizer_dir.iterdir():
            shutil.copy2(f, model_dir / f.name)
    return model_dir


def decide_promotion(
    candidate: dict,
    champion: dict | None,
    *,
    metric: str,
    min_improvement: float,
    max_label_drop: float | None,
    baseline: float | None = None,
    min_over_baseline: float = 0.0,
    max_slice_drop: float | None = None,
    min_slice_rows: int = 30,
) -> dict:
    """Whether `candidate` should replace `champion` (both `evaluate_classifier` results on
    the same rows): it must beat the trivial `baseline` (always answering the commonest
    label, scored by `metric` on the same rows) by more than `min_over_baseline`, whether or
    not there is a champion; beat the champion's `metric` by more than `min_improvement`;
    when `max_label_drop` is set, lose no more than that much F1 on any label; and when
    `max_slice_drop` is set, lose no more than that much `metric` on any slice group
    (`by_slice`) of at least `min_slice_rows` rows (a smaller group's figure is noise).

    Figures are compared with a 1e-9 tolerance, so 0.8 vs 0.7 + 0.1 is a tie, not a win.
    Returns {promote, reason}; the reason names every failing figure."""
    new = candidate[metric]
    if baseline is not None and not new > baseline + min_over_baseline + EPS:
        return {"promote": False, "reason": (
            f"{metric} {new:.3f} <= majority baseline {baseline:.3f} + {min_over_baseline:g}: "
            f"no better than always answering the commonest label")}
    if champion is None:
        return {"promote": True, "reason": "no champion yet" + (
            f"; {metric} {new:.3f} > majority baseline {baseline:.3f} + {min_over_baseline:g}"
            if baseline is not None else "")}
    old = champion[metric]
    failures = []
    if not new > old + min_improvement + EPS:
        failures.append(f"{metric} {new:.3f} <= champion {old:.3f} + {min_improvement:g}")
    if max_label_drop is not None:
        for label, m in champion["per_label"].items():
            f1 = candidate["per_label"].get(label, {}).get("f1", 0.0)
            if m["f1"] - f1 > max_label_drop + EPS:
                failures.append(
                    f"label '{label}' F1 {f1:.3f} < champion {m['f1']:.3f} - {max_label_drop:g}"
                )
    if max_slice_drop is not None:
        failures += _slice_drops(candidate, champion, metric, max_slice_drop, min_slice_rows)
    if failures:
        return {"promote": False, "reason": "; ".join(failures)}
    reason = f"{metric} {new:.3f} > champion {old:.3f} + {min_improvement:g}"
    if max_label_drop is not None:
        reason += f"; no label's F1 dropped by more than {max_label_drop:g}"
    if max_slice_drop is not None:
        reason += (f"; no slice's {metric} dropped by more than {max_slice_drop:g} "
                   f"(slices of {min_slice_rows}+ rows)")
    return {"promote": True, "reason": reason}


def _slice_drops(candidate: dict, champion: dict, metric: str, max_drop: float,
                 min_rows: int) -> list[str]:
    """One failure line per slice group where the candidate's `metric` fell more than
    `max_drop` below the champion's (both on the same held-out rows of that group)."""
    mine, theirs = candidate.get("by_slice") or {}, champion.get("by_slice") or {}
    failures = []
    for group, c in theirs.items():
        m = mine.get(group)
        if m is None or c["n"] < min_rows:
            continue
        if c[metric] - m[metric] > max_drop + EPS:
            failures.append(f"slice '{group}' {metric} {m[metric]:.3f} < champion "
                            f"{c[metric]:.3f} - {max_drop:g} ({c['n']} rows)")
    return failures


def decide_win_rate_promotion(
    versus_champion: dict | None,
    versus_base: dict,
    *,
    min_rows: int,
    min_lower_bound: float,
    candidate_reference: float | None = None,
    champion_reference: float | None = None,
    reference_metric: str = "rouge_l",
    max_reference_drop: float | None = None,
) -> dict:
    """The rule for text answers: a judge's pairwise verdicts (`training.text_eval.win_rate`
    results), read by their confidence bound, never by the bare rate.

    The candidate must have been compared on at least `min_rows` held-out rows, and the lower
    bound of its win-rate must reach `min_lower_bound`: against the champion when there is one,
    else against the base model. Where the task has references, its `reference_metric` may not
    fall more than `max_reference_drop` below the champion's. Returns {promote, reason}; the
    reason names every failing figure."""
    against, verdicts = (("champion", versus_champion) if versus_champion is not None
                         else ("base model", versus_base))
    failures = []
    if verdicts["n"] < min_rows:
        failures.append(f"compared with the {against} on {verdicts['n']} held-out rows, "
                        f"fewer than the {min_rows} the rule needs")
    shown = (f"win-rate {verdicts['win_rate']:.3f} against the {against} "
             f"({verdicts['wins']} wins, {verdicts['losses']} losses, {verdicts['ties']} "
             f"ties), {verdicts['confidence']:.0%} lower bound {verdicts['lower']:.3f}")
    if not verdicts["lower"] >= min_lower_bound - EPS:
        failures.append(f"{shown} < {min_lower_bound:g}")
    if (max_reference_drop is not None and candidate_reference is not None
            and champion_reference is not None
            and champion_reference - candidate_reference > max_reference_drop + EPS):
        failures.append(f"{reference_metric} {candidate_reference:.3f} < champion "
                        f"{champion_reference:.3f} - {max_reference_drop:g}")
    if failures:
        return {"promote": False, "reason": "; ".join(failures)}
    return {"promote": True, "reason": f"{shown} >= {min_lower_bound:g}"
            + ("" if versus_champion is not None else " (no champion yet)")}


def promote(registered_name: str, version: str | int, decision: dict) -> dict:
    """Apply `decision` (from `decide_promotion`): move `champion` to `version` if it says
    promote, and tag the version with the reason (tag `promotion`).

    Returns {promoted, previous_champion_version, reason}."""
    client = MlflowClient()
    previous = champion_version(registered_name)
    if decision["promote"]:
        client.set_registered_model_alias(registered_name, CHAMPION, str(version))
    client.set_model_version_tag(registered_name, str(version), "promotion", decision["reason"])
    return {
        "promoted": bool(decision["promote"]),
        "previous_champion_version": previous,
        "reason": decision["reason"],
    }


def git_commit() -> str:
    """The commit checked out in this repository, or "unknown" (no git, not a checkout).
    $POSTTRAIN_GIT_COMMIT wins: container images are built without .git."""
    if os.environ.get("POSTTRAIN_GIT_COMMIT"):
        return os.environ["POSTTRAIN_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"
