"""Reports people read: Prefect artifacts on the flow run, pictures and pages in MLflow.

    from flows.reports import publish_reports

    reports = publish_reports(spec, summary, out, client, mlflow_run_id, slices, balance,
                              train_result, dpo, tuned)

Called once at the end of the flow (flows/summary.py), after summary.json is written. It
makes

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

One module per thing made: `summary_page.py`, `model_card.py`, `plots.py`,
`prefect_artifacts.py`; `publish.py` gathers what the run did and calls them; `links.py` and
`markdown.py` hold what they share.
"""

from flows.reports.links import UI_ENV
from flows.reports.publish import NOTE_TAG, publish_reports

__all__ = ["NOTE_TAG", "UI_ENV", "publish_reports"]