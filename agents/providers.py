"""LLM providers on the official SDKs: one neutral, OpenAI-chat-shaped message format in,
one `Completion` out (docs/agent-runtime.md, "Provider").

`OpenAIProvider` speaks chat.completions (OpenAI, MiniMax, vLLM, Ollama, posttrain's simulated
teacher); `AnthropicProvider` speaks the Messages API (Claude, MiniMax's /anthropic). Clients are
built with `max_retries=0`: the gateway retries, so the rate limiter sees every 429/529. Every
SDK or transport failure leaves here as a `ProviderError` with a kind and, where the server
said so, `retry_after` in seconds.

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
def _provider_errors(*more: type[Exception]) -> Iterator[None]:
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


class _PerLoop:
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


# ── OpenAI chat.completions ───────────────────────────────────────────────────────────────
class OpenAIProvider:
    api = "openai"
    _ERRORS = (AttributeError, TypeError, KeyError, IndexError)

    def __init__(self, *, base_url: str | None, api_key: str, timeout: float = 60.0,
                 http_client: httpx2.Client | None = None,
                 async_http_client: httpx2.AsyncClient | None = None) -> None:
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout,
                                    max_retries=0, http_client=http_client)
        self._async = _PerLoop(lambda: openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0,
            http_client=async_http_client or openai.DefaultAioHttpClient()),
            owned=async_http_client is None)
        self.endpoint = str(self.client.base_url)
        # OpenAI's own API wants max_completion_tokens; compatible servers know max_tokens
        own = "api.openai.com" in self.endpoint
        self._max_key = "max_completion_tokens" if own else "max_tokens"

    def _request(self, model, messages, temperature, max_tokens, tools=None, **extra) -> dict:
        # The conversation travels in extra_body (merged into the JSON body as it is):
        # create() would first walk every message through the SDK's typed-dict transform, an
        # identity for these plain dicts that cost 3.3 ms of CPU for a 20-message (43 KB)
        # conversation, where encoding it costs 0.09 ms. The request sent is the same.
        kwargs: dict[str, Any] = {"model": model, "messages": [],
                                  "extra_body": {"messages": messages}, **extra}
        if tools:
            kwargs["tools"] = tools
        if temperature is not None:
            kwargs["temperature"] = temperature
        if max_tokens:
            kwargs[self._max_key] = max_tokens
        return kwargs

    def _create(self, kwargs: dict, model: str) -> Completion:
        with _provider_errors(*self._ERRORS):
            return _openai_completion(self.client.chat.completions.create(**kwargs), model)

    async def _acreate(self, kwargs: dict, model: str) -> Completion:
        with _provider_errors(*self._ERRORS):
            response = await self._async.get().chat.completions.create(**kwargs)
            return _openai_completion(response, model)

    def complete(self, *, model, messages, tools=None, temperature=None,
                 max_tokens=None) -> Completion:
        return self._create(self._request(model, messages, temperature, max_tokens, tools), model)

    async def acomplete(self, *, model, messages, tools=None, temperature=None,
                        max_tokens=None) -> Completion:
        return await self._acreate(
            self._request(model, messages, temperature, max_tokens, tools), model)

    def _json_request(self, model, messages, schema, schema_name, temperature,
                      max_tokens) -> dict:
        fmt = {"type": "json_schema",
               "json_schema": {"name": schema_name, "schema": schema, "strict": True}}
        return self._request(model, messages, temperature, max_tokens, response_format=fmt)

    def complete_json(self, *, model, messages, schema, schema_name, temperature=None,
                      max_tokens=None) -> tuple[dict, Completion]:
        completion = self._create(self._json_request(
            model, messages, schema, schema_name, temperature, max_tokens), model)
        return parse_json_reply(completion), completion

    async def acomplete_json(self, *, model, messages, schema, schema_name, temperature=None,
                             max_tokens=None) -> tuple[dict, Completion]:
        completion = await self._acreate(self._json_request(
            model, messages, schema, schema_name, temperature, max_tokens), model)
        return parse_json_reply(completion), completion


def _openai_completion(response: Any, model: str) -> Completion:
    if isinstance(response, str) or not response.choices:
        raise ProviderError("malformed", "the response has no choices")
    choice = response.choices[0]
    message = choice.message
    calls = [ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments or "")
             for c in message.tool_calls or [] if getattr(c, "function", None) is not None]
    usage = response.usage
    details = getattr(usage, "prompt_tokens_details", None)
    cache_read = (getattr(details, "cached_tokens", None) or 0) if details else 0
    cache_write = (getattr(details, "cache_write_tokens", None) or 0) if details else 0
    prompt = usage.prompt_tokens if usage else 0
    if message.refusal and not message.content:
        stop = "content_filter"
    else:
        stop = choice.finish_reason or ("tool_calls" if calls else "stop")
    return Completion(
        text=message.content, tool_calls=calls, stop_reason=stop,
        model=response.model or model,
        input_tokens=max(0, prompt - cache_read - cache_write),
        output_tokens=usage.completion_tokens if usage else 0,
        cache_read_tokens=cache_read, cache_write_tokens=cache_write,
    )


# ── Anthropic Messages ─────────────────────────────────────────────────────────────────────
_ANTHROPIC_STOPS = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls",
                    "max_tokens": "length", "refusal": "content_filter"}


def to_anthropic(messages: list[dict], tools: list[dict] | None = None):
    """(system, messages, tools) in Messages-API form from the neutral format."""
    system: list[str] = []
    out: list[dict] = []
    for m in messages:
        role = m["role"]
        if role == "system":
            system.append(m.get("content") or "")
        elif role == "tool":
            block = {"type": "tool_result", "tool_use_id": m["tool_call_id"],
                     "content": m.get("content") or ""}
            last = out[-1] if out else None
            if last and last["role"] == "user" and isinstance(last["content"], list) and all(
                b.get("type") == "tool_result" for b in last["content"]
            ):
                last["content"].append(block)
            else:
                out.append({"role": "user", "content": [block]})
        elif role == "assistant" and not m.get("content") and not m.get("tool_calls"):
            continue  # the API refuses empty turns; neighbouring user turns are merged
        elif role == "assistant" and m.get("tool_calls"):
            blocks: list[dict] = [{"type": "text", "text": m["content"]}] if m.get("content") else []
            for call in m["tool_calls"]:
                fn = call["function"]
                blocks.append({"type": "tool_use", "id": call["id"], "name": fn["name"],
                               "input": _tool_input(fn.get("arguments"))})
            out.append({"role": "assistant", "content": blocks})
        else:
            out.append({"role": role, "content": m.get("content") or ""})
    wire_tools = [_anthropic_tool(t) for t in tools or []]
    return ("\n\n".join(system) or None), out, wire_tools


def _tool_input(arguments: str | None) -> dict:
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {"_raw": arguments}
    return value if isinstance(value, dict) else {"_raw": arguments}


def _anthropic_tool(tool: dict) -> dict:
    fn = tool.get("function", tool)
    wire = {"name": fn["name"],
            "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
    if fn.get("description"):
        wire["description"] = fn["description"]
    return wire


class AnthropicProvider:
    api = "anthropic"
    _ERRORS = (AttributeError, TypeError, KeyError, AssertionError)

    def __init__(self, *, base_url: str | None, api_key: str, timeout: float = 60.0,
                 stream: bool = False, http_client: httpx2.Client | None = None,
                 async_http_client: httpx2.AsyncClient | None = None) -> None:
        self.client = anthropic.Anthropic(base_url=base_url, api_key=api_key, timeout=timeout,
                                          max_retries=0, http_client=http_client)
        self._async = _PerLoop(lambda: anthropic.AsyncAnthropic(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0,
            http_client=async_http_client or anthropic.DefaultAioHttpClient()),
            owned=async_http_client is None)
        self.endpoint = str(self.client.base_url)
        self.stream = stream

    @staticmethod
    def _request(model, messages, tools, temperature, max_tokens, **extra) -> dict:
        system, wire, wire_tools = to_anthropic(messages, tools)
        kwargs: dict[str, Any] = {"model": model, "messages": wire,
                                  "max_tokens": max_tokens or 4096, **extra}
        if system:
            kwargs["system"] = system
        if wire_tools:
            kwargs["tools"] = wire_tools
        if temperature is not None:  # not a named parameter of anthropic 2.x's create()
            kwargs["extra_body"] = {"temperature": temperature}
        return kwargs

    def _create(self, kwargs: dict, model: str) -> Completion:
        with _provider_errors(*self._ERRORS):
            if self.stream:
                with self.client.messages.stream(**kwargs) as stream:
                    message = _streamed(stream.get_final_message())
            else:
                message = self.client.messages.create(**kwargs)
            return _anthropic_completion(message, model)

    async def _acreate(self, kwargs: dict, model: str) -> Completion:
        client = self._async.get()
        with _provider_errors(*self._ERRORS):
            if self.stream:
                async with client.messages.stream(**kwargs) as stream:
                    message = _streamed(await stream.get_final_message())
            else:
                message = await client.messages.create(**kwargs)
            return _anthropic_completion(message, model)

    def complete(self, *, model, messages, tools=None, temperature=None,
                 max_tokens=None) -> Completion:
        return self._create(self._request(model, messages, tools, temperature, max_tokens),
                            model)

    async def acomplete(self, *, model, messages, tools=None, temperature=None,
                        max_tokens=None) -> Completion:
        return await self._acreate(
            self._request(model, messages, tools, temperature, max_tokens), model)

    def _json_request(self, model, messages, schema, temperature, max_tokens) -> dict:
        # the Messages API's json_schema format has no name
        config = {"format": {"type": "json_schema", "schema": schema}}
        return self._request(model, messages, None, temperature, max_tokens,
                             output_config=config)

    def complete_json(self, *, model, messages, schema, schema_name, temperature=None,
                      max_tokens=None) -> tuple[dict, Completion]:
        del schema_name
        completion = self._create(
            self._json_request(model, messages, schema, temperature, max_tokens), model)
        return parse_json_reply(completion), completion

    async def acomplete_json(self, *, model, messages, schema, schema_name, temperature=None,
                             max_tokens=None) -> tuple[dict, Completion]:
        del schema_name
        completion = await self._acreate(
            self._json_request(model, messages, schema, temperature, max_tokens), model)
        return parse_json_reply(completion), completion


def _streamed(message: Any) -> Any:
    """The streamed message, or a connection error when the stream ended before it did."""
    if message.stop_reason is None:
        raise ProviderError("connection", "the stream ended before the message")
    return message


def _anthropic_completion(message: Any, model: str) -> Completion:
    if isinstance(message, str):
        raise ProviderError("malformed", "the response is not a message")
    texts, calls = [], []
    for block in message.content:
        if block.type == "text":
            texts.append(block.text)
        elif block.type == "tool_use":
            calls.append(ToolCall(id=block.id, name=block.name, arguments=json.dumps(block.input)))
    usage = message.usage
    stop = message.stop_reason or ("tool_calls" if calls else "stop")
    return Completion(
        text="".join(texts) if texts else None, tool_calls=calls,
        stop_reason=_ANTHROPIC_STOPS.get(stop, stop), model=message.model or model,
        input_tokens=usage.input_tokens or 0, output_tokens=usage.output_tokens or 0,
        cache_read_tokens=usage.cache_read_input_tokens or 0,
        cache_write_tokens=usage.cache_creation_input_tokens or 0,
    )


# ── factories ──────────────────────────────────────────────────────────────────────────────
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


__all__ = ["AnthropicProvider", "Completion", "OpenAIProvider", "Provider", "ProviderError",
           "ToolCall", "close_async_clients", "make_openai_client", "make_provider",
           "run_on_own_loop", "to_provider_error"]
