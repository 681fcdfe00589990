"""The Anthropic Messages provider: Claude and MiniMax's /anthropic, through the official
`anthropic` SDK, and the translation of the neutral (OpenAI-chat-shaped) messages and tools
into Messages-API form (`to_anthropic`). The shared types, errors and per-loop async clients
are in agents/providers.py."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2  # the transport under the SDK (anthropic 2.x)

from agents.providers import (
    Completion,
    PerLoopClient,
    ProviderError,
    ToolCall,
    parse_json_reply,
    provider_errors,
)

__all__ = ["AnthropicProvider", "to_anthropic"]

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
        self._async = PerLoopClient(lambda: anthropic.AsyncAnthropic(
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
        with provider_errors(*self._ERRORS):
            if self.stream:
                with self.client.messages.stream(**kwargs) as stream:
                    message = _streamed(stream.get_final_message())
            else:
                message = self.client.messages.create(**kwargs)
            return _anthropic_completion(message, model)

    async def _acreate(self, kwargs: dict, model: str) -> Completion:
        client = self._async.get()
        with provider_errors(*self._ERRORS):
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
