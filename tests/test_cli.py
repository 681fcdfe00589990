"""The `posttrain teacher` command: a standalone simulated teacher the real openai SDK talks to."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

EXE = shutil.which("posttrain") or str(Path(sys.executable).parent / "posttrain")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_teacher_command_serves_openai_wire_format(small_warehouse_url, tmp_path):
    port, log = _free_port(), tmp_path / "requests.jsonl"
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
