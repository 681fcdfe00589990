"""The README's MLflow picture, taken from the demo's real run (`make screenshot`).

    python docs/screenshots/mlflow_run.py [--out runs/demo] [--png docs/screenshots/mlflow-run.png]

Reads `<out>/summary.json` (written by `make demo`), starts an MLflow server on that run's
tracking store, opens the parent run's page in Debian's chromium through Playwright, checks
the page shows the run's accuracy as summary.json has it (the metrics table filtered to
the accuracies), and saves the screenshot. The
MLflow Assistant panel, which MLflow opens on a browser's first visit, is kept closed (its
two localStorage keys are set before the page loads).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from flows.ui import _wait_for, stop

REPO_ROOT = Path(__file__).resolve().parents[2]

CHROMIUM = "/usr/bin/chromium"
ASSISTANT_CLOSED = """
window.localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
window.localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="the demo's run folder")
    ap.add_argument("--png", default=str(REPO_ROOT / "docs" / "screenshots" / "mlflow-run.png"))
    ap.add_argument("--height", type=int, default=800, help="viewport height in pixels")
    args = ap.parse_args(argv)
    summary_path = Path(args.out) / "summary.json"
    if not summary_path.is_file():
        sys.exit(f"{summary_path}: no such file; run `make demo` first")
    summary = json.loads(summary_path.read_text())
    if not Path(CHROMIUM).exists():
        sys.exit(f"needs Debian's chromium at {CHROMIUM} (apt-get install -y chromium)")
    from playwright.sync_api import expect, sync_playwright

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               MLFLOW_DISABLE_TELEMETRY="true")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         summary["mlflow_tracking_uri"], "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ui = f"http://127.0.0.1:{port}"
    try:
        if not _wait_for(ui + "/health", 120):
            sys.exit(f"the MLflow server did not answer {ui}/health in 120 s")
        from mlflow.tracking import MlflowClient

        run = MlflowClient(summary["mlflow_tracking_uri"]).get_run(summary["mlflow_run_id"])
        url = f"{ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": args.height})
            page.add_init_script(ASSISTANT_CLOSED)
            page.goto(url)
            expect(page.get_by_text(run.info.run_name).first).to_be_visible(timeout=60_000)
            # the metrics table filtered to the model's figures (accuracy, base, SFT, DPO)
            page.get_by_placeholder("Search metrics").fill("accuracy")
            row = page.get_by_role("row").filter(
                has=page.get_by_role("cell", name="accuracy", exact=True)).first
            expect(row).to_be_visible()
            shown = float(row.get_by_role("cell").all_inner_texts()[1])
            if abs(shown - summary["accuracy"]) > 1e-9:
                sys.exit(f"the page shows accuracy {shown}, summary.json {summary['accuracy']}")
            # the Assistant's panel stays shut (its button in the corner is fine)
            expect(page.get_by_text("Ask questions about your experiments").filter(
                visible=True)).to_have_count(0)
            page.screenshot(path=args.png)
            browser.close()
    finally:
        stop([server])
    print(f"{args.png}: MLflow run {run.info.run_name} ({url}), accuracy "
          f"{summary['accuracy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
