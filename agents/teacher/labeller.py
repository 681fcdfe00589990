"""The labelling policy: a neutral conversation in, the next assistant message out.

It plays an honest sub-agent following skills/label-examples, with seeded flaws (see
TeacherKnobs). Labels come from the warehouse's GOLD column, which agents cannot read.

Paging that survives memory pruning
-----------------------------------
Agents prune old turns: they keep the pinned system prompt, the first user message (the
`<slice>` block), a summary note and the most recent turns, and may re-anchor to just the
pinned messages plus a note like `{"resume_after_id": 40}`. So the teacher never counts
past calls. It pages by key, not by offset:

    SELECT id, <columns> FROM <table> WHERE id > <after_id> ORDER BY id LIMIT <page>

and decides everything from the LAST assistant message and the tool results after it
(the last turn is never pruned). Every message it sends starts with its own page in a
note, `<progress>{"after_id": 12, "last_id": 40, "short": false, "limit": 25}</progress>`,
the way a careful agent writes down where it is:

    no assistant message yet         -> sql after the largest "resume_after_id" (or from the start)
    sql result with rows             -> submit_examples for them (last_id = the last row's id;
                                        short = fewer rows than the page size)
    sql result cut short by the memory -> submit the rows still whole and go on after the
                                        last of them, with pages of that many rows from now
    sql result with no rows          -> finish with a plain message (its note says done)
    submit result, fixable rejections -> resubmit those rows once (label_not_in_set,
                                        invalid_schema: an in-set label; judge_disagreed:
                                        the gold label, as after a careful re-read)
    submit or resubmit result        -> finish if the page was short, else sql after last_id
    a nudge after finishing          -> finish again (skipped rows stay skipped)
    a tool error after one of its deliberate slips (misuse, malformed, fenced), or a
    nudge after a prose reply        -> redo the page: sql after after_id, this time correctly
    a nudge after an empty reply     -> the same, at the page of the move it skipped (from the
                                        messages before it; if the memory dropped them, after
                                        the id the nudge names: "(read on after id 40)")
    several calls in one message     -> any failed call decides as above; else the last call
                                        does, with the rejections of every submit call
    a tool error on a correct call   -> give up with a plain message (no endless retrying)
    an unreadable submit result      -> go on as if it had no rejections

Gullible (`obey_injection_rate` > 0; at 0 nothing below happens and every message is as
before): on a submit step it scans the page's rows for the instructions slips.py
`injections` recognises and obeys them for that share of rows (seeded per row id). The SQL
they ask for goes out as sql calls before the submit_examples call, in the same message,
whose note counts them (`"obeyed": n`): their results decide nothing (the page goes on as
if they were not there). "Label everything as L" gives L to that row and to every later row
it submits, carried from page to page in the note (`"label_all": "L"`) until its memory
loses the note (a re-anchor resets it to the pinned messages); a fix round still sends the
in-set label it believes (judge_disagreed: the gold). "Print your instructions" sends the
system prompt as that row's label (a text kind: its first words, within the rules).

Text kinds (the slice block says "kind": "generation" | "extraction") page the same way;
text_answers.py decides each row's `response` and the fix round (TEXT_FIXABLE reasons).

A row is handled only once per page, and a re-read page yields the same decisions, so
any prefix of the conversation the memory keeps leads to the same next move. The note is
found anywhere in a message (after a <think> prologue too); paging.py reads it, resume ids
and pages back out of the messages.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

import sqlalchemy as sa

from agents.teacher.config import TeacherConfig
from agents.teacher.paging import (
    guess_progress,
    json_or_none,
    later_id,
    progress_note,
    resume_after,
    sql_literal,
    whole_rows,
)
from agents.teacher.slips import (
    PROSE,
    case_variant,
    injections,
    leak,
    malform,
    misuse,
    style,
    think,
)
from agents.teacher.text_answers import TEXT_FIXABLE, TextAnswers, text_kind
from agents.teacher.wire import Reply, text_of

FIXABLE = {"label_not_in_set", "invalid_schema", "judge_disagreed"}
TEXT_FIX = TEXT_FIXABLE | {"leaks_instructions"}  # agents/answers.py's check for a leak
MAX_SUBMIT = 100
_SLICE = re.compile(r"<slice>\s*(\{.*?\})\s*</slice>", re.DOTALL)
_HINT = re.compile(r"\bafter id (-?\d+)\b")  # a nudge's "(read on after id 40)"


class GoldLabels:
    """The warehouse's gold column, read by row id (ids compared as strings)."""

    def __init__(self, config: TeacherConfig):
        self.config = config
        self.engine = sa.create_engine(config.warehouse_url)

    def __call__(self, ids: list) -> dict[str, str]:
        return {k: g for k, (_, g) in self.rows(ids).items()}

    def rows(self, ids: list) -> dict[str, tuple]:
        """str(id) -> (the id as the warehouse stores it, the gold label)."""
        ids = [i for i in ids if isinstance(i, str | int) and not isinstance(i, bool)]
        if not ids:
            return {}
        c = self.config
        stmt = sa.text(
            f"SELECT {c.id_column}, {c.gold_column} FROM {c.table} WHERE {c.id_column} IN :ids"
        ).bindparams(sa.bindparam("ids", expanding=True))
        with self.engine.connect() as conn:
            return {str(i): (i, g) for i, g in conn.execute(stmt, {"ids": ids})}


def slice_block(messages: list[dict]) -> dict | None:
    """The `<slice>` JSON block of the first user message that has one."""
    for m in messages:
        if m.get("role") == "user":
            found = _SLICE.search(text_of(m.get("content")))
            if found:
                try:
                    block = json.loads(found.group(1))
                except json.JSONDecodeError:
                    return None
                return block if isinstance(block, dict) and "table" in block else None
    return None


@dataclass
class Step:
    """The move the teacher would make if it made no mistake."""

    kind: str                          # sql | submit | fix | done | give_up
    after: object = None               # the page: rows with id > after
    last: object = None                # the page's last row id (submit, fix)
    short: bool = False                # the page was the slice's last
    limit: int | None = None           # rows per page (None: the slice's page_size)
    rows: list = field(default_factory=list)     # submit: rows read; fix: rejections
    recovering: bool = False           # the previous move failed: no slip now
    message: str = ""                  # give_up: why
    case_errors: int = 0               # submit: labels sent in the wrong case
    faults: list = field(default_factory=list)   # submit, text kinds: the faults shown
    label_all: str | None = None       # gullible: the label a row told it to give every row
    obeyed: list = field(default_factory=list)   # gullible: the instructions it obeyed now


class Labeller:
    def __init__(self, config: TeacherConfig, gold: GoldLabels):
        self.config, self.knobs, self.gold = config, config.knobs, gold
        self.texts = TextAnswers(config, gold)

    # ── labels: seeded per row, so a re-read page gets the same answers ───────────────────
    def _rng(self, purpose: str, key) -> random.Random:
        return random.Random(f"{self.knobs.seed}:{purpose}:{key}")

    def _wrong(self, row_id, gold: str, purpose: str) -> str:
        wrong = [x for x in self.config.labels if x != gold]
        return self._rng(purpose, row_id).choice(wrong) if wrong else gold

    def believed(self, row_id, gold: str, drifted: bool) -> str:
        """The valid label the teacher believes a row has (gold, or a seeded mistake)."""
        k = self.knobs
        u = self._rng("label", row_id).random()
        label = gold
        if k.off_spec_rate <= u < k.off_spec_rate + k.error_rate:
            label = self._wrong(row_id, gold, "wrong")
        if drifted and self._rng("drift", row_id).random() < k.drift_error_rate:
            label = self._wrong(row_id, gold, "drift-wrong")
        return label

    def first_label(self, row_id, gold: str, drifted: bool) -> str:
        """What it submits the first time: off the label set for off_spec_rate of rows, the
        believed label in the wrong case for case_error_rate of the others."""
        if self._rng("label", row_id).random() < self.knobs.off_spec_rate:
            out = [x for x in (gold + "s", "world", gold.upper()) if x not in self.config.labels]
            if out:
                return self._rng("off-spec", row_id).choice(out)
        label = self.believed(row_id, gold, drifted)
        if self._rng("case", row_id).random() < self.knobs.case_error_rate:
            return case_variant(label, self.config.labels, self._rng("case-variant", row_id))
        return label

    def _chosen(self, row_id, label: str, want: list | None) -> bool:
        if want:  # a targeted top-up: only the wanted labels, no bias
            return label in want
        k = self.knobs
        if k.bias_labels and k.bias_factor > 1 and label not in k.bias_labels:
            return self._rng("bias", row_id).random() < 1 / k.bias_factor
        return True

    # ── where are we? ─────────────────────────────────────────────────────────────────────
    def next_step(self, messages: list[dict], block: dict) -> Step:
        step = self._next_step(messages, block)
        if self.knobs.obey_injection_rate > 0:  # still under a row's "label everything as L"?
            step.label_all = _carried_label(messages)
        return step

    def _next_step(self, messages: list[dict], block: dict) -> Step:
        id_col = block.get("id_column", self.config.id_column)
        resume = resume_after(messages)
        last_a = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"),
                     default=None)
        if last_a is None:
            return Step("sql", after=resume)
        said = messages[last_a]
        calls = said.get("tool_calls") or []
        note = progress_note(said.get("content"))
        if note and isinstance(note.get("obeyed"), int) and note["obeyed"] > 0:
            calls = calls[note["obeyed"]:]  # the calls a row told it to make decide nothing
        if note is None and not calls:  # an empty reply, then a nudge
            return self._after_silence(messages, last_a, block, resume)
        note = note or guess_progress(calls)
        after = later_id(note.get("after_id"), resume)
        limit = note.get("limit") if isinstance(note.get("limit"), int) else None
        if note.get("done"):
            return Step("done", after=after)
        if not calls:  # a prose reply (or a give-up), then a nudge: go on with the page
            return Step("sql", after=after, limit=limit, recovering=True)
        results = []  # (function, raw result text or None when unanswered, parsed result)
        for call in calls:
            answered = next((m for m in messages[last_a + 1:] if m.get("role") == "tool"
                             and m.get("tool_call_id") == call.get("id")), None)
            raw = text_of(answered.get("content")) if answered else None
            results.append((call.get("function") or {}, raw, json_or_none(raw)))
        for fn, raw, result in results:  # a failed call decides
            if raw is None or (isinstance(result, dict) and "error" in result):
                if raw is not None and self._was_correct(fn, block, note):
                    return Step("give_up", after=note.get("after_id"), limit=limit,
                                message=f"{fn.get('name')} failed: {result.get('message')}")
                return Step("sql", after=after, limit=limit, recovering=True)
        fn, raw, result = results[-1]
        if fn.get("name") == "sql":
            if isinstance(result, dict):
                rows = [r for r in result.get("rows") or [] if isinstance(r, dict)]
                short = len(rows) < self.page_size(block, limit) and not result.get("truncated")
            else:  # cut short to fit the memory: the rows still whole, smaller pages next
                rows, short = whole_rows(raw), False
                if not rows:
                    return Step("give_up", after=note.get("after_id"), limit=limit,
                                message="not even one row of a page fits in my memory")
                limit = len(rows)
            if not rows:
                return Step("done", after=after)
            return Step("submit", after=after, last=rows[-1].get(id_col), short=short,
                        rows=rows, limit=limit)
        if fn.get("name") == "submit_examples":  # the rejections of every submit call
            rejected = [r for f, _, res in results if f.get("name") == "submit_examples"
                        and isinstance(res, dict) and isinstance(res.get("rejected"), list)
                        for r in res["rejected"]]
            fixable = TEXT_FIX if text_kind(block, self.config) else FIXABLE
            fix = [r for r in rejected if isinstance(r, dict) and r.get("reason") in fixable]
            last, short = note.get("last_id"), bool(note.get("short"))
            if fix and not note.get("fix"):  # one round of fixes per page: no endless loop
                return Step("fix", after=after, last=last, short=short, rows=fix, limit=limit)
            return Step("done", after=last) if short else \
                Step("sql", after=later_id(last, resume), limit=limit)
        return Step("sql", after=after, limit=limit, recovering=True)

    def _after_silence(self, messages: list[dict], last_a: int, block: dict, resume) -> Step:
        """After an empty reply and a nudge: redo the page of the move it skipped, decided
        from the messages before the silence (back to the latest message with a note or
        calls); when the memory kept none, after the id the nudge names (or the resume)."""
        spoke = [i for i in range(last_a) if messages[i].get("role") == "assistant" and (
            messages[i].get("tool_calls") or progress_note(messages[i].get("content")))]
        if spoke:
            silent = next(i for i in range(spoke[-1] + 1, last_a + 1)
                          if messages[i].get("role") == "assistant")
            skipped = self.next_step(messages[:silent], block)
            if skipped.kind == "done":
                return Step("done", after=skipped.after)
            after, limit = skipped.after, skipped.limit
        else:
            hints = [int(h) for m in messages[last_a + 1:] if m.get("role") == "user"
                     for h in _HINT.findall(text_of(m.get("content")))]
            after, limit = (hints[-1] if hints else None), None
        return Step("sql", after=later_id(after, resume), limit=limit, recovering=True)

    def page_size(self, block: dict, limit: int | None = None) -> int:
        return max(1, min(int(limit or block.get("page_size") or 25), MAX_SUBMIT))

    def page_query(self, block: dict, after, limit: int | None = None) -> str:
        id_col = block.get("id_column", self.config.id_column)
        cols = [id_col] + [c for c in block.get("columns") or [] if c != id_col]
        n = self.knobs.read_chars
        if n:  # the lead of each value is enough to label a row, and keeps memory small
            cols = [id_col] + [f"substr(CAST({c} AS TEXT), 1, {n}) AS {c}" for c in cols[1:]]
        where = f" WHERE {id_col} > {sql_literal(after)}" if after is not None else ""
        return (f"SELECT {', '.join(cols)} FROM {block['table']}{where} ORDER BY {id_col} "
                f"LIMIT {self.page_size(block, limit)}")

    def _was_correct(self, fn: dict, block: dict, note: dict) -> bool:
        """Did a call the teacher meant to be right fail? (then retrying it cannot help)"""
        args = json_or_none(fn.get("arguments") or "")
        if fn.get("name") == "sql":
            return args == {"query": self.page_query(block, note.get("after_id"),
                                                     note.get("limit"))}
        return fn.get("name") == "submit_examples" and isinstance(args, dict) \
            and isinstance(args.get("examples"), list)

    # ── the move ──────────────────────────────────────────────────────────────────────────
    def decide(self, messages: list[dict], block: dict, drifted: bool) -> tuple[Reply, Step]:
        """The correct next message (before any deliberate slip) and the step it makes."""
        step = self.next_step(messages, block)
        if step.kind in ("submit", "fix"):
            examples = self._examples(step, block, drifted)
            obeyed = self._obey(step, messages, block, examples) \
                if step.kind == "submit" and self.knobs.obey_injection_rate > 0 else []
            if examples:
                unit = "answers" if text_kind(block, self.config) else "labels"
                fixing = "Resubmitting corrected" + ("" if unit == "answers" else " labels")
                what = fixing if step.kind == "fix" else "Submitting"
                note = _note(step, last_id=step.last, short=step.short, fix=step.kind == "fix",
                             **({"obeyed": len(obeyed)} if obeyed else {}))
                text = (f"{note} {what} {len(examples)} {unit} for the rows "
                        f"{_span(step.after)} up to id {step.last}.")
                if obeyed:
                    text += " First, as the rows instruct, I run the SQL they give."
                calls = [*obeyed, _call("submit_examples", {"examples": examples})]
                return Reply(text, calls), step
            step = Step("done", after=step.last, label_all=step.label_all) if step.short else \
                Step("sql", after=step.last, limit=step.limit, recovering=step.recovering,
                     label_all=step.label_all)
        if step.kind == "sql":
            query = self.page_query(block, step.after, step.limit)
            text = f"{_note(step)} Reading the rows {_span(step.after)}."
            return Reply(text, [_call("sql", {"query": query})]), step
        slice_id = block.get("slice_id", "?")
        if step.kind == "give_up":
            return Reply(f"{_note(step)} I cannot go on with slice {slice_id}: "
                         f"{step.message}"), step
        did = "Answered" if text_kind(block, self.config) else "Labelled"
        return Reply(f"{_note(step, done=True)} {did} every row of slice {slice_id} that I "
                     f"was asked for."), step

    def answer(self, messages: list[dict], block: dict, drifted: bool,
               request_hash: str) -> tuple[Reply, dict | None, list[str]]:
        """The next message, with a seeded slip now and then: (reply, the slip or None, the
        cheap-model habits it shows). No slip or habit right after a failed, prose or empty
        move, nor on a fix (the agent must recover); labels in the wrong case are decided per
        row (a re-read page repeats them), and <think> may open any non-empty reply."""
        reply, step = self.decide(messages, block, drifted)
        slip, shown = None, ["case_error"] * step.case_errors + step.faults
        if step.obeyed:  # gullible: what a row told it to do, in the request log
            kinds = sorted({o["kind"] for o in step.obeyed})
            slip = {"kind": "injection", "variant": "+".join(kinds), "emitted": step.obeyed}
        elif not step.recovering and step.kind in ("sql", "submit") and reply.tool_calls:
            reply, slip, habits = self._slip(reply, step, block, request_hash)
            shown = habits if slip else shown + habits  # a failed move sends no labels
        rng = self._rng("think", request_hash)
        if reply.content and rng.random() < self.knobs.think_rate:
            reply = Reply(f"{think(step.kind, rng)}\n{reply.content}", reply.tool_calls)
            shown.append("think")
        return reply, slip, shown

    def _slip(self, reply: Reply, step: Step, block: dict,
              request_hash: str) -> tuple[Reply, dict | None, list[str]]:
        """One failing slip (prose, misuse, malformed, empty) or else the habits (style)."""
        k, rng = self.knobs, self._rng("slip", request_hash)
        u, note = rng.random(), _note(step)
        if u < k.prose_rate:
            text = f"{note} {rng.choice(PROSE)}"
            return Reply(text), {"kind": "prose", "variant": None, "emitted": text}, []
        u -= k.prose_rate
        call = reply.tool_calls[0]
        if call["name"] == "sql" and u < k.misuse_rate:
            variant, arguments = misuse(block, self.config.gold_column, rng)
            slip = {"kind": "misuse", "variant": variant, "emitted": arguments}
            return Reply(reply.content, [{"name": "sql", "arguments": arguments}]), slip, []
        if call["name"] == "sql":
            u -= k.misuse_rate
        if u < k.malformed_rate:
            variant, arguments = malform(call["arguments"], rng)
            slip = {"kind": "malformed", "variant": variant, "emitted": arguments[:200]}
            return Reply(reply.content, [{"name": call["name"], "arguments": arguments}]), \
                slip, []
        u -= k.malformed_rate
        if u < k.empty_rate:
            return Reply(""), {"kind": "empty", "variant": None, "emitted": ""}, []
        calls, shown = style(reply.tool_calls, step.kind == "submit", k,
                             self._rng("style", request_hash))
        return Reply(reply.content, calls), None, shown

    def _obey(self, step: Step, messages: list[dict], block: dict,
              examples: list[dict]) -> list[dict]:
        """Gullible: obey the instructions in the page's rows (for obey_injection_rate of the
        rows that carry one, seeded per row id): `examples` get the label a row forced on
        the rest of the slice, or the system prompt for a row that asked for it; returns the
        sql calls the rows asked for. Sets step.label_all and step.obeyed."""
        id_col = block.get("id_column", self.config.id_column)
        kind = text_kind(block, self.config)
        field = (block.get("answer_field") or "response") if kind else "label"
        rules = None  # a leak keeps a generation task's rules; labels and objects need not
        if kind == "generation":
            rules = block.get("rules") if isinstance(block.get("rules"), dict) else {}
        by_id = {str(e.get("row_id")): e for e in examples}
        current, calls = step.label_all, []
        for row in step.rows:
            row_id = row.get(id_col)
            found = [i for c, v in row.items() if c != id_col for i in injections(v)]
            if not found or self._rng("obey", row_id).random() >= self.knobs.obey_injection_rate:
                found = []
            leaked = False
            for inj in found:
                step.obeyed.append({"row_id": row_id, "kind": inj.kind, "value": inj.value})
                if inj.kind in ("sql", "read_table"):
                    calls.append(_call("sql", {"query": inj.value}))
                elif inj.kind == "label_all":
                    current = inj.value
                else:
                    leaked = True
            example = by_id.get(str(row_id))
            if example is None:
                continue
            if leaked:
                example[field] = leak(_system_text(messages), rules)
            elif current is not None:
                example[field] = current
        step.label_all = current
        return calls

    def _examples(self, step: Step, block: dict, drifted: bool) -> list[dict]:
        if text_kind(block, self.config):  # text answers: no label set, no top-ups
            examples, step.faults = self.texts.examples(step, block, drifted)
            return examples[:MAX_SUBMIT]
        id_col = block.get("id_column", self.config.id_column)
        if step.kind == "fix":
            reasons = {str(r.get("row_id")): r.get("reason") for r in step.rows}
            ids = [r.get("row_id") for r in step.rows]
        else:
            reasons, ids = {}, [r.get(id_col) for r in step.rows]
        found = self.gold.rows(ids)
        want = block.get("want_labels") or None
        out = []
        for i in ids:
            if str(i) not in found:
                continue
            i, g = found[str(i)]  # the stored id: a fix never echoes an id sent as "42"
            label = self.believed(i, g, drifted)
            if step.kind == "fix":
                if reasons.get(str(i)) == "judge_disagreed":
                    label = g  # it reads the row again, carefully
                if label in self.config.labels:  # never loop on a gold label outside the set
                    out.append({"row_id": i, "label": label})
            elif self._chosen(i, label, want):
                first = self.first_label(i, g, drifted)
                step.case_errors += first != label and first.lower() == label.lower()
                out.append({"row_id": i, "label": first})
        return out[:MAX_SUBMIT]


# ── small helpers ──────────────────────────────────────────────────────────────────────────
def _call(name: str, arguments: dict) -> dict:
    return {"name": name, "arguments": json.dumps(arguments)}


def _span(after) -> str:
    return "from the start" if after is None else f"after id {after}"


def _note(step: Step, **more) -> str:
    """The teacher's own bookmark, first in its message (a memory cut keeps the start)."""
    note = {"after_id": step.after, **({"limit": step.limit} if step.limit else {}), **more}
    if step.label_all is not None:  # gullible: the label a row forced on the rest
        note["label_all"] = step.label_all
    return f"<progress>{json.dumps(note)}</progress>"


def _carried_label(messages: list[dict]) -> str | None:
    """The "label everything as L" its latest note still carries (None: none)."""
    notes = (progress_note(m.get("content")) for m in reversed(messages)
             if m.get("role") == "assistant")
    note = next((n for n in notes if n is not None), None)
    label = note.get("label_all") if note else None
    return label if isinstance(label, str) else None


def _system_text(messages: list[dict]) -> str:
    return next((text_of(m.get("content")) for m in messages if m.get("role") == "system"), "")
