"""LLM clients. For now: an OpenAI-compatible client (OpenAI, MiniMax, vLLM, Ollama, and
posttrain's simulated teacher all speak this wire format)."""

from __future__ import annotations

import openai


def make_openai_client(
    base_url: str | None, api_key: str, timeout: float = 60, max_retries: int = 2
) -> openai.OpenAI:
    """An `openai.OpenAI` client; `base_url` includes `/v1` (None: OpenAI's own)."""
    return openai.OpenAI(
        base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries
    )
