"""Shared by tests/test_teacher_*.py (the simulated teacher over real HTTP, through the
official `openai` and `anthropic` SDKs, against the real SQLite warehouse of BBC articles): the
tool schemas, the opening of a labelling conversation, the two SDKs behind one neutral call,
and a small agent stand-in. Their fixtures, `teacher` and `gold`, are in tests/conftest.py.

The agent stand-in (`Agent` below) plays the agent loop's part: it keeps the
conversation in neutral messages, runs the `sql` and `submit_examples` tools on the
warehouse (simple SELECTs only; a mini gate that, like agents.gates, takes "42" for row 42
and wants labels spelled exactly), nudges after prose or an empty reply, and can prune its
memory down to the pinned messages plus the last turn. Arguments in a ```json fence are an
error unless it is told to strip them (`strip_fences`).
"""

from __future__ import annotations

import json
import re
from collections import Counter

import anthropic
import openai
import sqlalchemy as sa

LABELS = ["business", "entertainment", "politics", "sports", "tech"]
PINNED = "Follow the skill.\n\n## Your task (pinned)\nLabel a BBC article with its topic."
SQL_SCHEMA = {"type": "object", "properties": {"query": {"type": "string"}},
              "required": ["query"]}
SUBMIT_SCHEMA = {"type": "object", "properties": {"examples": {"type": "array"}},
                 "required": ["examples"]}
TOOLS = [{"type": "function", "function": {"name": n, "description": n, "parameters": p}}
         for n, p in (("sql", SQL_SCHEMA), ("submit_examples", SUBMIT_SCHEMA))]
# what this test's stand-in agent lets through: the teacher's paging query, reading whole
# columns or (the default, `read_chars`) the lead of each one
SAFE_SQL = re.compile(r"^SELECT id(, (\w+|substr\(CAST\(\w+ AS TEXT\), 1, \d+\) AS \w+))* "
                      r"FROM articles( WHERE id > \d+)? ORDER BY id LIMIT \d+$")


def logged(server) -> list[dict]:
    return [json.loads(line) for line in server.log.read_text().splitlines()]


def opening(page_size=25, **extra) -> list[dict]:
    block = {"slice_id": "all", "table": "articles", "columns": ["id", "title"],
             "id_column": "id", "rows": 200, "labels": LABELS, "page_size": page_size, **extra}
    return [{"role": "system", "content": PINNED},
            {"role": "user", "content": f"Label every row.\n<slice>\n{json.dumps(block)}\n</slice>"}]


# ── the two SDKs, behind one neutral call ──────────────────────────────────────────────────
def openai_caller(server, stream=False, **client_kw):
    client = openai.OpenAI(base_url=server.base_url, api_key="k", **{"max_retries": 0,
                                                                    **client_kw})

    def call(messages):
        if not stream:
            m = client.chat.completions.create(model="sim", messages=messages,
                                               tools=TOOLS).choices[0].message
            return m.content, [(c.id, c.function.name, c.function.arguments)
                               for c in m.tool_calls or []]
        text, calls = "", {}
        for chunk in client.chat.completions.create(model="sim", messages=messages, tools=TOOLS,
                                                    stream=True):
            delta = chunk.choices[0].delta if chunk.choices else None
            text += (delta.content or "") if delta else ""
            for c in (delta.tool_calls or []) if delta else []:
                slot = calls.setdefault(c.index, ["", "", ""])
                slot[0] = c.id or slot[0]
                slot[1] = (c.function.name or slot[1]) if c.function else slot[1]
                slot[2] += (c.function.arguments or "") if c.function else ""
        return text or None, [tuple(v) for _, v in sorted(calls.items())]

    return call


def to_anthropic(messages: list[dict]) -> tuple[str, list[dict]]:
    """Neutral messages -> (system, Anthropic messages): tool_use and tool_result blocks."""
    system, out = "", []
    for m in messages:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "assistant":
            blocks = [{"type": "text", "text": m["content"]}] if m.get("content") else []
            blocks += [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                        "input": _input(c["function"]["arguments"])}
                       for c in m.get("tool_calls") or []]
            out.append({"role": "assistant", "content": blocks})
        elif m["role"] == "tool":
            block = {"type": "tool_result", "tool_use_id": m["tool_call_id"],
                     "content": m["content"]}
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):
                out[-1]["content"].append(block)
            else:
                out.append({"role": "user", "content": [block]})
        else:
            out.append({"role": "user", "content": m["content"]})
    return system, out


def _input(arguments: str):
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return {"_malformed": arguments}


def anthropic_caller(server, stream=False, **client_kw):
    client = anthropic.Anthropic(base_url=server.url, api_key="k", max_retries=0, **client_kw)
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in TOOLS]

    def call(messages):
        system, msgs = to_anthropic(messages)
        kw = {"model": "claude-sim", "max_tokens": 1024, "system": system, "messages": msgs,
              "tools": tools}
        if stream:
            with client.messages.stream(**kw) as s:
                reply = s.get_final_message()
        else:
            reply = client.messages.create(**kw)
        assert reply.stop_reason in ("tool_use", "end_turn")
        text = "".join(b.text for b in reply.content if b.type == "text")
        calls = [(b.id, b.name, b.input if isinstance(b.input, str) else json.dumps(b.input))
                 for b in reply.content if b.type == "tool_use"]
        return text or None, calls

    return call


# ── a stand-in for the agent loop ──────────────────────────────────────────────────────────
class Agent:
    def __init__(self, engine, call, *, keep_last: int | None = None, page_size=25,
                 strip_fences=False, **extra):
        self.engine, self.call, self.keep_last = engine, call, keep_last
        self.strip_fences = strip_fences
        self.pinned, self.turns = opening(page_size, **extra), []
        self.accepted: dict[int, str] = {}
        self.rejected: Counter[str] = Counter()
        self.submitted: list[list[dict]] = []  # per submit call, in order
        self.tool_errors = self.calls = self.nudges = 0
        self.done = False

    def messages(self) -> list[dict]:
        if self.keep_last is None or len(self.turns) <= self.keep_last:
            return self.pinned + [m for turn in self.turns for m in turn]
        note = {"role": "user", "content": f"[memory] {len(self.turns) - self.keep_last} "
                "earlier turns were pruned."}
        return self.pinned + [note] + [m for t in self.turns[-self.keep_last:] for m in t]

    def run(self, max_calls=80) -> Agent:
        while not self.done and self.calls < max_calls:
            self.step()
        return self

    def step(self) -> None:
        self.calls += 1
        text, calls = self.call(self.messages())
        said = {"role": "assistant", "content": text}
        if not calls:
            if len(self.accepted) < 200 and self.nudges < 20 and (
                    not text or "<progress>" in text and '"done": true' not in text):
                self.nudges += 1
                self.turns.append([said, {"role": "user", "content": "Continue with the tools."}])
            else:
                self.done = True
            return
        said["tool_calls"] = [{"id": i, "type": "function",
                               "function": {"name": n, "arguments": a}} for i, n, a in calls]
        answers = [{"role": "tool", "tool_call_id": i,
                    "content": json.dumps(self.sql(a) if n == "sql" else self.submit(a))}
                   for i, n, a in calls]
        self.turns.append([said, *answers])

    def error(self, kind, message) -> dict:
        self.tool_errors += 1
        return {"error": kind, "message": message}

    def parse(self, arguments: str):
        if self.strip_fences:
            found = re.fullmatch(r"```(?:json)?\n(.*)\n```", arguments.strip(), re.DOTALL)
            arguments = found.group(1) if found else arguments
        return json.loads(arguments)

    def sql(self, arguments: str) -> dict:
        try:
            args = self.parse(arguments)
        except json.JSONDecodeError as e:
            return self.error("invalid_arguments", f"arguments are not valid JSON: {e}")
        if not isinstance(args, dict) or set(args) != {"query"} or not isinstance(
                args["query"], str):
            return self.error("invalid_arguments", "expected exactly {query: string}")
        if not SAFE_SQL.match(args["query"]):
            return self.error("sql_rejected", "only a plain SELECT of your table is allowed")
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(sa.text(args["query"])).mappings()]
        return {"rows": rows, "row_count": len(rows), "truncated": False}

    def submit(self, arguments: str) -> dict:
        try:
            examples = self.parse(arguments)["examples"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            return self.error("invalid_arguments", f"not a submission: {e}")
        self.submitted.append(examples)
        accepted, rejected = 0, []
        for e in examples:
            row = int(e["row_id"])  # the gate takes "42" for row 42 too
            reason = ("label_not_in_set" if e["label"] not in LABELS
                      else "duplicate" if row in self.accepted else None)
            if reason:
                self.rejected[reason] += 1
                rejected.append({"row_id": e["row_id"], "reason": reason, "message": reason})
            else:
                self.accepted[row] = e["label"]
                accepted += 1
        return {"accepted": accepted, "rejected": rejected}
