"""Shared by tests/test_deploy_files_*.py: where the deployment files live, and the user id
the images run as."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
IMAGE_UID = 10001  # the images' USER; the Kubernetes pod's runAsUser must match
