"""The `posttrain teacher` command: a standalone simulated teacher the real openai SDK talks to."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from tests.servers import free_port

EXE = shutil.which("posttrain") or str(Path(sys.executable).parent / "posttrain")



def test_teacher_command_serves_openai_wire_format(small_warehouse_url, tmp_path):
    port, log = free_port(), tmp_path / "requests.jsonl"
    proc = subprocess.Popen(
        [EXE, "teacher", "--port", str(port), "--warehouse", small_warehouse_url,
         "--table", "articles", "--id-column", "id", "--gold-column", "topic",
         "--labels", "business,entertainment,politics,sports,tech", "--error-rate", "0",
         "--api-key", "k", "--request-log", str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}/v1"
        for _ in range(200):
            try:
                httpx.get(f"{base}/models", headers={"Authorization": "Bearer k"}, timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=base, api_key="k", max_retries=0)
        task = {"slice_id": "all", "table": "articles", "columns": ["id", "title"],
                "id_column": "id", "rows": 200, "labels": ["business", "tech"], "page_size": 5}
        reply = client.chat.completions.create(
            model="simulated-teacher",
            messages=[{"role": "user", "content": f"<slice>\n{json.dumps(task)}\n</slice>"}],
            tools=[{"type": "function", "function": {
                "name": "sql", "parameters": {"type": "object", "properties": {
                    "query": {"type": "string"}}}}}],
        )
        call = reply.choices[0].message.tool_calls[0]
        assert call.function.name == "sql"
        assert "LIMIT 5" in json.loads(call.function.arguments)["query"]
        assert reply.usage.prompt_tokens > 0
        assert reply.system_fingerprint == "posttrain-simulated-teacher"
        assert len(log.read_text().splitlines()) == 1
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0]
    assert "SIMULATED teacher" in out


def test_teacher_command_says_what_is_missing():
    proc = subprocess.run([EXE, "teacher", "--port", "0"], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("teacher: missing --warehouse, --table, --id-column, "
                                   "--gold-column, --labels (or pass --spec SPEC)")


def test_missing_api_key_is_one_clear_error_before_any_work(tmp_path, monkeypatch):
    import yaml

    demo = Path(__file__).resolve().parent.parent / "examples" / "news_topics" / "spec.yaml"
    data = yaml.safe_load(demo.read_text())
    data["warehouse"]["url"] = f"sqlite:///{demo.parent / 'warehouse.db'}"
    data["llm"]["generator"] = {"api": "openai", "model": "MiniMax-M2.5",
                                "endpoint": "https://api.minimax.io/v1",
                                "api_key_env": "POSTTRAIN_TEST_NO_SUCH_KEY"}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    monkeypatch.delenv("POSTTRAIN_TEST_NO_SUCH_KEY", raising=False)
    proc = subprocess.run([EXE, "run", str(spec), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "llm.generator: $POSTTRAIN_TEST_NO_SUCH_KEY is not set; export it or name a Prefect "
        "Secret block in llm.generator.secret_block")
    assert not (tmp_path / "out").exists()  # nothing started


def test_cli_gives_a_temporary_prefect_server_120_s_by_default(monkeypatch):
    """A busy machine: `posttrain` sets Prefect's ephemeral start-up wait to 120 s unless the
    user set it, and that is the setting Prefect reads."""
    import os

    from prefect.settings import get_current_settings

    from flows.cli import STARTUP_TIMEOUT_ENV, main

    demo = Path(__file__).resolve().parent.parent / "examples" / "news_topics" / "spec.yaml"
    assert STARTUP_TIMEOUT_ENV == "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    monkeypatch.delenv(STARTUP_TIMEOUT_ENV, raising=False)
    assert main(["validate", str(demo)]) == 0
    assert os.environ[STARTUP_TIMEOUT_ENV] == "120"
    assert get_current_settings().server.ephemeral.startup_timeout_seconds == 120
    monkeypatch.setenv(STARTUP_TIMEOUT_ENV, "300")  # the user's own value wins
    assert main(["validate", str(demo)]) == 0
    assert os.environ[STARTUP_TIMEOUT_ENV] == "300"


def test_temporary_prefect_server_too_slow_says_what_to_set(tmp_path, small_warehouse_url):
    """Prefect's temporary server given 0 s to start really times out (Prefect raises
    "Timed out while attempting to connect to ephemeral Prefect API server"); `posttrain run`
    turns that into one message naming both settings, exit 1, no traceback."""
    import os

    import yaml

    demo = Path(__file__).resolve().parent.parent / "examples" / "news_topics" / "spec.yaml"
    data = yaml.safe_load(demo.read_text())
    data["warehouse"]["url"] = small_warehouse_url
    data["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0",
               PREFECT_HOME=str(tmp_path / "prefect"))
    proc = subprocess.run([EXE, "run", str(spec), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, check=False, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert ("posttrain: Prefect's temporary API server did not start within 0 s "
            "($PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=0). On a busy machine give it "
            "longer, e.g. export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=300, or run "
            "against a running Prefect server: prefect server start, then export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api") in proc.stderr.splitlines()
    assert not (tmp_path / "out").exists()  # the flow never started
