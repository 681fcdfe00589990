"""The agent loop: one sub-agent labels one slice through an OpenAI-compatible chat API.

    system  = the skill's instructions + the pinned task (description, labels)
    user    = a <slice> block (JSON) the agent reads to know its table, columns, page size
    repeat up to max_turns LLM calls:
        call chat.completions with the `sql` and `submit_examples` tools -> on_call(record)
        no tool calls in the reply          -> stop: "completed"
        each tool call -> validate its arguments (pydantic), run it, answer with a tool message
            sql              -> SQLTool.run (rejections and errors go back as tool errors)
            submit_examples  -> each item through the Gate -> on_example(accepted|rejected)
    a failed LLM call (after the SDK's own retries) -> stop: "llm_error: ..."

Nothing here knows about Prefect or the pipeline: callers pass plain objects and two
callbacks, and get an `AgentResult` back.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import openai
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from agents.gates import Gate
from agents.skills import Skill
from agents.sql_tool import SQLRejected, SQLTool

MAX_SUBMIT = 100


@dataclass
class AgentResult:
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    tool_errors: int = 0
    stopped_reason: str = ""


# ── tools: what the model sees, and how its arguments are validated ────────────────────────
class SqlArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: StrictStr


class SubmitArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    examples: list[Any] = Field(min_length=1, max_length=MAX_SUBMIT)  # items: the gate's job


def tool_specs(table: str, labels: list[str]) -> list[dict]:
    return [
        {
            "type": "function",
            "function": {
                "name": "sql",
                "description": f"Run one read-only SELECT over table {table!r} (your slice "
                "only). Returns {rows, row_count, truncated}.",
                "parameters": {
                    "type": "object",
                    "properties": {"query": {"type": "string", "description": "One SELECT."}},
                    "required": ["query"],
                    "additionalProperties": False,
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "submit_examples",
                "description": f"Submit labelled rows (at most {MAX_SUBMIT} per call). Returns "
                "{accepted, rejected: [{row_id, reason, message}]}.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "examples": {
                            "type": "array",
                            "maxItems": MAX_SUBMIT,
                            "items": {
                                "type": "object",
                                "properties": {
                                    "row_id": {"type": ["string", "integer"]},
                                    "label": {"type": "string", "enum": list(labels)},
                                },
                                "required": ["row_id", "label"],
                                "additionalProperties": False,
                            },
                        }
                    },
                    "required": ["examples"],
                    "additionalProperties": False,
                },
            },
        },
    ]


# ── the opening messages ───────────────────────────────────────────────────────────────────
def build_messages(skill: Skill, task: dict, sql_tool: SQLTool) -> list[dict]:
    """System prompt (skill + pinned task) and the first user message with the <slice>."""
    required = ("description", "labels", "slice_id", "rows", "page_size")
    missing = [k for k in required if k not in task]
    if missing:
        raise ValueError(f"task is missing {', '.join(missing)}")
    scoped = sql_tool.scoped
    system = (
        f"{skill.instructions}\n\n## Your task (pinned)\n{task['description']}\n"
        f"Labels (use exactly one of these per row): {', '.join(task['labels'])}"
    )
    block = {
        "slice_id": task["slice_id"],
        "table": scoped.name,
        "columns": list(scoped.columns),
        "id_column": scoped.id_column,
        "rows": task["rows"],
        "labels": list(task["labels"]),
        "page_size": task["page_size"],
    }
    user = (
        f"Label every row of your slice, following the skill.\n<slice>\n"
        f"{json.dumps(block)}\n</slice>"
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def request_hash(model: str, messages: list[dict], tools: list[dict], params: dict) -> str:
    """sha256 of the canonical JSON of everything that determines a reply."""
    blob = json.dumps(
        {"model": model, "messages": messages, "tools": tools, "params": params},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


# ── the loop ───────────────────────────────────────────────────────────────────────────────
def run_agent(
    client: openai.OpenAI,
    *,
    model: str,
    temperature: float,
    skill: Skill,
    task: dict,
    sql_tool: SQLTool,
    gate: Gate,
    row_lookup: Callable[[str | int], dict | None],
    on_example: Callable[[dict], None],
    on_call: Callable[[dict], None],
    max_turns: int,
    agent_name: str,
    provider: str = "openai",
) -> AgentResult:
    """Run one sub-agent over its slice until it finishes, fails, or spends max_turns."""
    tools = tool_specs(sql_tool.scoped.name, task["labels"])
    messages = build_messages(skill, task, sql_tool)
    params = {"temperature": temperature}
    result = AgentResult(stopped_reason="max_turns")

    for _ in range(max_turns):
        # 1. one LLM call, always recorded
        record = {  # exactly these keys: callers pass them on as keyword arguments
            "provider": provider, "model": model,
            "request_hash": request_hash(model, messages, tools, params),
            "input_tokens": 0, "output_tokens": 0, "latency_ms": 0.0, "status": "ok", "error": None,
        }
        started = time.perf_counter()
        try:
            response = client.chat.completions.create(
                model=model, messages=messages, tools=tools, temperature=temperature
            )
            if not response.choices:
                raise ValueError("the response has no choices")
        except (openai.OpenAIError, ValueError) as e:
            error = f"{e.__class__.__name__}: {str(e)[:300]}"
            record.update(status="error", error=error, latency_ms=_ms(started))
            result.calls += 1
            on_call(record)
            result.stopped_reason = f"llm_error: {error}"
            break
        usage = response.usage
        choice = response.choices[0]
        record.update(
            latency_ms=_ms(started),
            input_tokens=usage.prompt_tokens if usage else 0,
            output_tokens=usage.completion_tokens if usage else 0,
        )
        result.calls += 1
        result.input_tokens += record["input_tokens"]
        result.output_tokens += record["output_tokens"]
        on_call(record)

        # 2. a reply without tool calls ends the agent
        reply = choice.message
        calls = reply.tool_calls or []
        assistant: dict = {"role": "assistant", "content": reply.content}
        if calls:
            assistant["tool_calls"] = [_call_dict(c) for c in calls]
        messages.append(assistant)
        if not calls:
            result.stopped_reason = "completed"
            break

        # 3. run each tool call and answer it
        for call in calls:
            name = getattr(getattr(call, "function", None), "name", None)
            arguments = getattr(getattr(call, "function", None), "arguments", None)
            if name == "sql":
                content = _run_sql(arguments, sql_tool, result)
            elif name == "submit_examples":
                content = _run_submit(
                    arguments, gate, row_lookup, on_example, agent_name, result
                )
            else:
                content = _tool_error(
                    result, "unknown_tool", f"no tool {name!r}; use sql or submit_examples"
                )
            answer = json.dumps(content, ensure_ascii=False)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": answer})
    return result


# ── the tools ──────────────────────────────────────────────────────────────────────────────
def _run_sql(arguments: str | None, sql_tool: SQLTool, result: AgentResult) -> dict:
    args = _parse_args(arguments, SqlArgs, result)
    if isinstance(args, dict):
        return args
    try:
        return sql_tool.run(args.query)
    except SQLRejected as e:
        return _tool_error(result, "sql_rejected", e.reason)
    except sa.exc.SQLAlchemyError as e:
        detail = str(getattr(e, "orig", None) or e).splitlines()[0]
        return _tool_error(result, "sql_error", f"the database refused the query: {detail}")


def _run_submit(arguments, gate, row_lookup, on_example, agent_name, result) -> dict:
    args = _parse_args(arguments, SubmitArgs, result)
    if isinstance(args, dict):
        return args
    accepted, rejected = 0, []
    for item in args.examples:
        verdict = gate.check(item, row_lookup)
        example = {"agent": agent_name, "row_id": verdict.row_id, "label": verdict.label}
        if verdict.ok:
            accepted += 1
            on_example({**example, "row": verdict.row, "status": "accepted"})
        else:
            result.rejected[verdict.reason] = result.rejected.get(verdict.reason, 0) + 1
            on_example({**example, "row": None, "status": "rejected", "reason": verdict.reason,
                        "message": verdict.message})
            rejected.append(
                {"row_id": verdict.row_id, "reason": verdict.reason, "message": verdict.message}
            )
    result.accepted += accepted
    return {"accepted": accepted, "rejected": rejected}


def _parse_args(arguments: str | None, model: type[BaseModel], result: AgentResult):
    """The validated arguments, or a tool-error dict to send back."""
    try:
        raw = json.loads(arguments or "")
    except json.JSONDecodeError as e:
        return _tool_error(result, "invalid_arguments", f"arguments are not valid JSON: {e}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'arguments'}: {err['msg']}" for err in e.errors()
        )
        return _tool_error(result, "invalid_arguments", problems)


def _tool_error(result: AgentResult, kind: str, message: str) -> dict:
    result.tool_errors += 1
    return {"error": kind, "message": message}


def _call_dict(call) -> dict:
    fn = getattr(call, "function", None)
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": getattr(fn, "name", ""), "arguments": getattr(fn, "arguments", "")},
    }


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
