"""What every LLM provider shares: one neutral, OpenAI-chat-shaped message format in, one
`Completion` out (docs/agent-runtime.md, "Provider").

The providers: `OpenAIProvider` (agents/openai_provider.py) speaks chat.completions (OpenAI,
MiniMax, vLLM, Ollama, posttrain's simulated teacher); `AnthropicProvider`
(agents/anthropic_provider.py) speaks the Messages API (Claude, MiniMax's /anthropic);
`make_provider` (agents/provider_factory.py) makes either. Clients are built with
`max_retries=0`: the gateway retries, so the rate limiter sees every 429/529. Every SDK or
transport failure leaves a provider as a `ProviderError` with a kind and, where the server said
so, `retry_after` in seconds.

This module holds what they share: `ToolCall`, `Completion`, `ProviderError` and the
`Provider` protocol; the mapping of SDK, transport and decoding failures to a `ProviderError`
(`to_provider_error`, `provider_errors`); the async SDK clients, one per event loop
(`PerLoopClient`, `close_async_clients`, `run_on_own_loop`); and the parsing of
structured-output replies (`parse_json_reply`).

Each provider has a blocking face (`complete`, `complete_json`: the SDK's sync client) and an
async one (`acomplete`, `acomplete_json`: the SDK's async client on the aiohttp transport,
`DefaultAioHttpClient`), which is how hundreds of agents share one event loop: the aiohttp
transport costs about 1 ms of CPU a call where httpx costs 1.7 (shared/STACK.md). An aiohttp
session belongs to the loop that opened it, so the async client is made per running loop;
`close_async_clients()` closes the ones opened on the current loop, before it ends.

Token counts are normalised: `input_tokens` excludes cache reads and cache writes (Anthropic's
meaning; OpenAI's `prompt_tokens` includes its cached tokens, so they are subtracted), so
`input + output + cache_read + cache_write` is every token processed and each is priced once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, TypeVar

import aiohttp
import anthropic
import httpx2  # the transport under both SDKs (anthropic 2.x, openai 3.x)
import openai

T = TypeVar("T")
RETRYABLE = frozenset({"rate_limited", "overloaded", "server", "timeout", "connection", "malformed"})


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # raw JSON text, as the model wrote it (may be malformed)


@dataclass
class Completion:
    text: str | None
    tool_calls: list[ToolCall]
    stop_reason: str  # stop | tool_calls | length | content_filter | <provider's own>
    model: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Completion:
        names = set(cls.__dataclass_fields__)
        kept = {k: v for k, v in d.items() if k in names}
        kept["tool_calls"] = [ToolCall(**c) for c in d.get("tool_calls") or []]
        return cls(**kept)


class ProviderError(Exception):
    """One failed provider call. `kind` is one of rate_limited, overloaded, server, timeout,
    connection, auth, bad_request, malformed; `retryable` follows from it. `completion` is set
    when the model did answer (and spent tokens) but the answer was unusable."""

    def __init__(self, kind: str, message: str = "", *, retry_after: float | None = None,
                 status: int | None = None, completion: Completion | None = None) -> None:
        super().__init__(f"{kind}: {message}" if message else kind)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after
        self.status = status
        self.completion = completion
        self.retryable = kind in RETRYABLE


class Provider(Protocol):
    api: str
    endpoint: str

    def complete(self, *, model: str, messages: list[dict], tools: list[dict] | None,
                 temperature: float | None, max_tokens: int | None) -> Completion: ...

    def complete_json(self, *, model: str, messages: list[dict], schema: dict,
                      schema_name: str, temperature: float | None,
                      max_tokens: int | None) -> tuple[dict, Completion]: ...

    async def acomplete(self, *, model: str, messages: list[dict], tools: list[dict] | None,
                        temperature: float | None, max_tokens: int | None) -> Completion: ...

    async def acomplete_json(self, *, model: str, messages: list[dict], schema: dict,
                             schema_name: str, temperature: float | None,
                             max_tokens: int | None) -> tuple[dict, Completion]: ...


# ── errors ──────────────────────────────────────────────────────────────────────────────────
_STATUS_KINDS = {408: "timeout", 409: "server", 429: "rate_limited", 529: "overloaded",
                 401: "auth", 403: "auth"}
_TYPE_KINDS = {  # Anthropic `error.type`, for errors that arrive inside a 200 SSE stream
    "rate_limit_error": "rate_limited", "overloaded_error": "overloaded", "api_error": "server",
    "timeout_error": "timeout", "authentication_error": "auth", "permission_error": "auth",
}


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds from `retry-after-ms`, else `retry-after` (seconds or an HTTP date)."""
    if headers is None:
        return None
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000)
    except ValueError:
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _status_kind(status: int, body: object) -> str:
    if status in _STATUS_KINDS:
        return _STATUS_KINDS[status]
    if status >= 500:
        return "server"
    if status >= 400:
        return "bad_request"
    error = body.get("error") if isinstance(body, dict) else None
    etype = error.get("type") if isinstance(error, dict) else None
    return _TYPE_KINDS.get(etype, "server" if etype else "malformed")


def to_provider_error(e: Exception) -> ProviderError:
    """Map an SDK, transport or decoding exception to a `ProviderError`."""
    if isinstance(e, ProviderError):
        return e
    text = str(e)[:500]
    if (refused := _refused(e)) is not None:
        return ProviderError("connection", str(refused)[:500])
    if isinstance(e, (openai.APITimeoutError, anthropic.APITimeoutError, httpx2.TimeoutException)):
        return ProviderError("timeout", text)
    if isinstance(e, (openai.APIConnectionError, anthropic.APIConnectionError,
                      httpx2.TransportError)):
        return ProviderError("connection", text)
    if isinstance(e, (openai.APIResponseValidationError, anthropic.APIResponseValidationError)):
        return ProviderError("malformed", text, status=e.status_code)
    if isinstance(e, (openai.APIStatusError, anthropic.APIStatusError)):
        kind = _status_kind(e.status_code, e.body)
        if isinstance(e, anthropic.OverloadedError):
            kind = "overloaded"
        return ProviderError(kind, text, status=e.status_code,
                             retry_after=retry_after_seconds(e.response.headers))
    if isinstance(e, (ValueError, AttributeError, TypeError, KeyError, IndexError,
                      AssertionError)):
        return ProviderError("malformed", f"{e.__class__.__name__}: {text}")
    return ProviderError("server", f"{e.__class__.__name__}: {text}")


def _refused(e: BaseException) -> aiohttp.ClientConnectorError | None:
    """The aiohttp error behind `e` when the connection could not be made. The SDKs' aiohttp
    transport maps it to a connect *timeout* (its exception map prefers the broader class),
    so a server that is down would otherwise read as a slow one."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, aiohttp.ClientConnectorError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


_CAUGHT = (openai.OpenAIError, anthropic.AnthropicError, httpx2.HTTPError, ValueError)


@contextmanager
def provider_errors(*more: type[Exception]) -> Iterator[None]:
    """Whatever the SDK, the transport or the reply's decoding raises leaves as a
    ProviderError (the same for the sync and the async calls)."""
    try:
        yield
    except _CAUGHT + more as e:
        raise to_provider_error(e) from e


# ── async clients, one per event loop ─────────────────────────────────────────────────────
# loop -> {holder id: client} for every async client opened on that loop
_LOOP_CLIENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOOP_LOCK = threading.Lock()
_HOLDER_IDS = itertools.count()


class PerLoopClient:
    """A provider's async SDK client for the running event loop, made on first use there.

    The thread and Dask runners give each agent its own loop (`run_agent` is `asyncio.run`
    of the async loop), the async runner one loop for all: either way a client never crosses
    loops. A client over an HTTP client the caller passed in (tests) is never closed here."""

    def __init__(self, make: Callable[[], Any], owned: bool):
        self._make, self._owned = make, owned
        self._id = next(_HOLDER_IDS)

    def get(self) -> Any:
        loop = asyncio.get_running_loop()
        with _LOOP_LOCK:
            clients = _LOOP_CLIENTS.setdefault(loop, {})
            client = clients.get(self._id)
            if client is None:
                client = clients[self._id] = (self._make(), self._owned)
            return client[0]


async def close_async_clients() -> None:
    """Close the async SDK clients opened on the running loop (their aiohttp sessions)."""
    with _LOOP_LOCK:
        clients = _LOOP_CLIENTS.pop(asyncio.get_running_loop(), {})
    for client, owned in clients.values():
        if owned:
            await client.close()


def run_on_own_loop(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, closing the async SDK clients opened on that loop before it ends
    (an aiohttp session left open warns when it is collected): how a thread runs agents."""

    async def closing() -> T:
        try:
            return await main
        finally:
            await close_async_clients()

    return asyncio.run(closing())


# ── structured output ──────────────────────────────────────────────────────────────────────
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_json_reply(completion: Completion) -> dict:
    """The JSON object in a structured-output reply (tolerating <think> tags and a code fence
    from compatible servers), else ProviderError("malformed") carrying the completion."""
    text = _THINK.sub("", completion.text or "").strip()
    if m := _FENCE.match(text):
        text = m.group(1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProviderError("malformed", f"reply is not JSON: {e}", completion=completion) from e
    if not isinstance(data, dict):
        raise ProviderError("malformed", "reply is not a JSON object", completion=completion)
    return data


__all__ = ["Completion", "PerLoopClient", "Provider", "ProviderError", "ToolCall",
           "close_async_clients", "parse_json_reply", "provider_errors", "retry_after_seconds",
           "run_on_own_loop", "to_provider_error"]
