"""Scrub secrets from anything about to be logged or stored: error messages, transcripts,
records. `redact(obj)` returns a copy of any nested str/dict/list/tuple in which

- the values of environment variables named *_API_KEY, *_TOKEN, *_SECRET (8+ characters),
- API keys (`sk-…`, `sk-ant-…`), `Bearer <token>` and `x-api-key: <token>`

are replaced by `[REDACTED]`. Dict keys are left as they are.
"""

from __future__ import annotations

import os
import re
from typing import Any

MARK = "[REDACTED]"
_SUFFIXES = ("_API_KEY", "_TOKEN", "_SECRET")
_PATTERNS = [
    (re.compile(r"sk-ant-[A-Za-z0-9_-]{16,}"), MARK),
    (re.compile(r"sk-[A-Za-z0-9_-]{16,}"), MARK),
    (re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE), r"\g<1>" + MARK),
    (re.compile(r"(x-api-key[\"']?\s*[:=]\s*[\"']?)[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE),
     r"\g<1>" + MARK),
]


def env_secrets(environ: dict[str, str] | None = None) -> list[str]:
    """Secret-looking environment values, longest first (so no secret is half-replaced)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if k.upper().endswith(_SUFFIXES) and len(v) >= 8}
    return sorted(values, key=len, reverse=True)


def redact(obj: Any, *, secrets: list[str] | None = None) -> Any:
    """A copy of `obj` with secrets replaced; `secrets` defaults to `env_secrets()`."""
    return _walk(obj, env_secrets() if secrets is None else secrets)


def _walk(obj: Any, secrets: list[str]) -> Any:
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    if isinstance(obj, dict):
        return {k: _walk(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_walk(v, secrets) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_walk(v, secrets) for v in obj)
    return obj


def redact_text(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MARK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text
