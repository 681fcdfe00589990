"""LLM providers on the official SDKs: one neutral, OpenAI-chat-shaped message format in,
one `Completion` out (docs/agent-runtime.md, "Provider").

`OpenAIProvider` speaks chat.completions (OpenAI, MiniMax, vLLM, Ollama, posttrain's simulated
teacher); `AnthropicProvider` speaks the Messages API (Claude, MiniMax's /anthropic). Clients are
built with `max_retries=0`: the gateway retries, so the rate limiter sees every 429/529. Every
SDK or transport failure leaves here as a `ProviderError` with a kind and, where the server
said so, `retry_after` in seconds.

Token counts are normalised: `input_tokens` excludes cache reads and cache writes (Anthropic's
meaning; OpenAI's `prompt_tokens` includes its cached tokens, so they are subtracted), so
`input + output + cache_read + cache_write` is every token processed and each is priced once.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import anthropic
import httpx2  # the transport under both SDKs (anthropic 2.x, openai 3.x)
import openai

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


_CAUGHT = (openai.OpenAIError, anthropic.AnthropicError, httpx2.HTTPError, ValueError)


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

    def __init__(self, *, base_url: str | None, api_key: str, timeout: float = 60.0,
                 http_client: httpx2.Client | None = None) -> None:
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout,
                                    max_retries=0, http_client=http_client)
        self.endpoint = str(self.client.base_url)
        # OpenAI's own API wants max_completion_tokens; compatible servers know max_tokens
        own = "api.openai.com" in self.endpoint
        self._max_key = "max_completion_tokens" if own else "max_tokens"

    def _create(self, model, messages, temperature, max_tokens, **extra) -> Completion:
        kwargs: dict[str, Any] = {"model": model, "messages": messages, **extra}
        if temperature is not None:
            kwargs["temperature"] = temperature
        if max_tokens:
            kwargs[self._max_key] = max_tokens
        try:
            response = self.client.chat.completions.create(**kwargs)
            return _openai_completion(response, model)
        except _CAUGHT + (AttributeError, TypeError, KeyError, IndexError) as e:
            raise to_provider_error(e) from e

    def complete(self, *, model, messages, tools=None, temperature=None,
                 max_tokens=None) -> Completion:
        extra = {"tools": tools} if tools else {}
        return self._create(model, messages, temperature, max_tokens, **extra)

    def complete_json(self, *, model, messages, schema, schema_name, temperature=None,
                      max_tokens=None) -> tuple[dict, Completion]:
        fmt = {"type": "json_schema",
               "json_schema": {"name": schema_name, "schema": schema, "strict": True}}
        completion = self._create(model, messages, temperature, max_tokens, response_format=fmt)
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

    def __init__(self, *, base_url: str | None, api_key: str, timeout: float = 60.0,
                 stream: bool = False, http_client: httpx2.Client | None = None) -> None:
        self.client = anthropic.Anthropic(base_url=base_url, api_key=api_key, timeout=timeout,
                                          max_retries=0, http_client=http_client)
        self.endpoint = str(self.client.base_url)
        self.stream = stream

    def _create(self, model, messages, tools, temperature, max_tokens, **extra) -> Completion:
        system, wire, wire_tools = to_anthropic(messages, tools)
        kwargs: dict[str, Any] = {"model": model, "messages": wire,
                                  "max_tokens": max_tokens or 4096, **extra}
        if system:
            kwargs["system"] = system
        if wire_tools:
            kwargs["tools"] = wire_tools
        if temperature is not None:  # not a named parameter of anthropic 2.x's create()
            kwargs["extra_body"] = {"temperature": temperature}
        try:
            if self.stream:
                with self.client.messages.stream(**kwargs) as stream:
                    message = stream.get_final_message()
                if message.stop_reason is None:
                    raise ProviderError("connection", "the stream ended before the message")
            else:
                message = self.client.messages.create(**kwargs)
            return _anthropic_completion(message, model)
        except _CAUGHT + (AttributeError, TypeError, KeyError, AssertionError) as e:
            raise to_provider_error(e) from e

    def complete(self, *, model, messages, tools=None, temperature=None,
                 max_tokens=None) -> Completion:
        return self._create(model, messages, tools, temperature, max_tokens)

    def complete_json(self, *, model, messages, schema, schema_name, temperature=None,
                      max_tokens=None) -> tuple[dict, Completion]:
        del schema_name  # the Messages API's json_schema format has no name
        config = {"format": {"type": "json_schema", "schema": schema}}
        completion = self._create(model, messages, None, temperature, max_tokens,
                                  output_config=config)
        return parse_json_reply(completion), completion


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
                  stream: bool = False, http_client: httpx2.Client | None = None) -> Provider:
    """A provider for `api` ("openai" | "anthropic"). `stream` applies to Anthropic (long
    generations stream, then `get_final_message()`); `http_client` is for tests."""
    if api == "openai":
        return OpenAIProvider(base_url=base_url, api_key=api_key, timeout=timeout,
                              http_client=http_client)
    if api == "anthropic":
        return AnthropicProvider(base_url=base_url, api_key=api_key, timeout=timeout,
                                 stream=stream, http_client=http_client)
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
           "ToolCall", "make_openai_client", "make_provider", "to_provider_error"]
