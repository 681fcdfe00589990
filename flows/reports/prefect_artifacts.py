"""The run's Prefect artifacts, on its flow run's Artifacts tab (keys start with the spec's
name): `<name>-summary` (the summary page), `<name>-slices` (one row per agent slice),
`<name>-label-distribution` and `<name>-training-loss` (images served by the MLflow UI).

Made only inside a flow or task run: outside one, Prefect would start a throwaway API of its
own.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.context import FlowRunContext, TaskRunContext

from flows.reports.links import artifact_url, slug
from flows.spec import Spec

IMAGES = (("label-distribution", "plots/label_distribution.png",
           "label counts before top-up, after top-up, curated"),
          ("training-loss", "plots/sft_loss.png", "SFT train loss"))


def in_prefect_run() -> bool:
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def make_prefect_artifacts(spec: Spec, summary: dict, markdown: str, slice_table: list[dict],
                           plots: list[str], ui: str, mlflow_run_id: str,
                           attempt: Callable[[str, Callable[[], object]], object]
                           ) -> dict[str, str]:
    """The artifacts above, each through `attempt` (one that fails is reported, the others
    still made); returns {key: artifact id}."""
    key = slug(spec.name)
    made: dict[str, str] = {}

    def make(suffix: str, fn: Callable[..., object], **kwargs) -> None:
        made[f"{key}-{suffix}"] = str(fn(key=f"{key}-{suffix}", _sync=True, **kwargs))

    attempt("Prefect summary artifact", lambda: make(
        "summary", create_markdown_artifact, markdown=markdown,
        description=f"{spec.name} run {str(summary['run_id'])[:8]}: "
                    f"{summary['model_name']} v{summary['model_version']}"))
    attempt("Prefect slices artifact", lambda: make(
        "slices", create_table_artifact, table=slice_table,
        description=f"{spec.name}: one row per agent slice"))
    for suffix, path, what in IMAGES:
        if path in plots:
            attempt(f"Prefect {suffix} artifact", lambda s=suffix, p=path, w=what: make(
                s, create_image_artifact, image_url=artifact_url(ui, mlflow_run_id, p),
                description=f"{spec.name}: {w} (served by the MLflow UI at {ui})"))
    return made
