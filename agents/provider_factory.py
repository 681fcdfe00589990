"""Making a provider: `make_provider` ("openai" | "anthropic"), and a plain OpenAI client."""

from __future__ import annotations

import httpx2  # the transport under both SDKs (anthropic 2.x, openai 3.x)
import openai

from agents.anthropic_provider import AnthropicProvider
from agents.openai_provider import OpenAIProvider
from agents.providers import Provider

__all__ = ["make_openai_client", "make_provider"]


def make_provider(api: str, *, base_url: str | None, api_key: str, timeout: float = 60.0,
                  stream: bool = False, http_client: httpx2.Client | None = None,
                  async_http_client: httpx2.AsyncClient | None = None) -> Provider:
    """A provider for `api` ("openai" | "anthropic"). `stream` applies to Anthropic (long
    generations stream, then `get_final_message()`); `http_client` (the sync calls) and
    `async_http_client` (the async ones; default: aiohttp, one per event loop) are for tests."""
    clients = {"http_client": http_client, "async_http_client": async_http_client}
    if api == "openai":
        return OpenAIProvider(base_url=base_url, api_key=api_key, timeout=timeout, **clients)
    if api == "anthropic":
        return AnthropicProvider(base_url=base_url, api_key=api_key, timeout=timeout,
                                 stream=stream, **clients)
    raise ValueError(f"unknown api {api!r}: use 'openai' or 'anthropic'")


def make_openai_client(
    base_url: str | None, api_key: str, timeout: float = 60, max_retries: int = 2
) -> openai.OpenAI:
    """An `openai.OpenAI` client; `base_url` includes `/v1` (None: OpenAI's own). Kept for
    agents/loop.py until it moves onto `make_provider` + the gateway."""
    return openai.OpenAI(
        base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries
    )
