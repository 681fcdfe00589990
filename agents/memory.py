"""Agent memory: what the model sees, kept under a token budget (answers "memory collapse").

    memory = AgentMemory(budget_tokens=24_000)
    memory.pin(system); memory.pin(first_user)          # spec + skill + slice: never evicted
    memory.add_turn([assistant, *tool_results], importance=1.0, note="read rows 1-25")
    gateway.complete(messages=memory.messages(), ...)    # always <= budget_tokens

A *turn* is one assistant message (maybe with `tool_calls`) plus the tool messages that
answer it. A turn is kept or dropped whole: Anthropic rejects a `tool_result` whose
`tool_use` is gone, and a `tool_use` left without its result.

`messages()` is the pinned messages, then (once anything was pruned or reset) ONE summary
note `{"role": "user", "content": "[memory] ..."}`, then the kept turns in order.

Pruning: while pinned + summary + kept turns exceed the budget, the turn with the lowest

    score = importance * 2 ** (-age / half_life)      age = turns added after it

is evicted (ties: the older one), never the newest turn. Because every score decays by the
same factor per new turn, the order between two turns never changes, so eviction is the
same as ranking by `seq + half_life * log2(importance)`: importance 2 is worth `half_life`
turns of recency, importance 4 twice that, importance 0 goes first. Each evicted turn's
`note` (a short digest the caller writes) goes into the summary, which stays bounded: it
always keeps the counts (turns pruned, tool calls by name) and drops the oldest digests
first. If the newest turn alone does not fit beside the pinned messages and the summary,
its tool-result contents are cut, with a visible marker, rather than exceed the budget
(then its other text, and its tool-call arguments, which become `{"_memory": "..."}`).

`MemoryBudgetError` is raised by `pin()` when the pinned messages would leave less than
`headroom` (the summary's own bound + min(64, budget/4)) for the conversation, and by
`messages()` only if the newest turn cannot fit even cut to its bare structure.
"""

from __future__ import annotations

import bisect
import copy
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4  # role, separators and framing a provider adds around each message
MAX_NOTE_CHARS = 160  # one turn's digest
MAX_NOTES = 64  # digests remembered for the summary (the oldest beyond this only count)
MARKER = "…[memory: cut {cut} of {total} chars to fit the context budget]"

TokenCount = Callable[[dict], int]


def approx_tokens(message_or_text: dict | str | Iterable[dict] | None) -> int:
    """About chars/4 over content and tool-call names and arguments, +4 per message.

    An estimate, not a tokenizer: English prose runs near 4 chars per token, JSON and
    digits nearer 3, and no single tokenizer serves every provider. That is fine for a
    budget because the budget is a ceiling set with room to spare (say 3/4 of the model's
    context window), and the true counts come back with every call (`usage.input_tokens`,
    recorded in the ledger), so a budget that runs tight shows up there. Pass an exact
    counter as `AgentMemory(count=...)` when one is at hand.
    """
    if message_or_text is None:
        return 0
    if isinstance(message_or_text, str):
        return math.ceil(len(message_or_text) / CHARS_PER_TOKEN)
    if isinstance(message_or_text, dict):
        chars = _chars(message_or_text.get("content"))
        for call in message_or_text.get("tool_calls") or []:
            fn = call.get("function") or {}
            chars += _chars(fn.get("name")) + _chars(fn.get("arguments"))
        return math.ceil(chars / CHARS_PER_TOKEN) + MESSAGE_OVERHEAD
    return sum(approx_tokens(m) for m in message_or_text)


def _chars(value) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    return len(json.dumps(value, ensure_ascii=False, default=str))  # content blocks, dicts


class MemoryBudgetError(ValueError):
    """The budget cannot hold what must be kept (the pinned messages, the newest turn)."""


@dataclass
class _Turn:
    seq: int
    messages: list[dict]
    importance: float
    note: str | None
    tokens: int
    calls: Counter


class AgentMemory:
    """Pinned messages + a pruned, summarised history, always within `budget_tokens`."""

    def __init__(
        self,
        budget_tokens: int,
        count: TokenCount = approx_tokens,
        *,
        half_life: float = 8.0,
        summary_tokens: int | None = None,
    ):
        if not isinstance(budget_tokens, int) or budget_tokens < 1:
            raise ValueError(f"budget_tokens must be a positive integer, got {budget_tokens!r}")
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0 turns, got {half_life!r}")
        self.budget_tokens = budget_tokens
        self.count = count
        self.half_life = float(half_life)
        self.summary_tokens = summary_tokens or max(48, min(256, budget_tokens // 8))
        # what the pins must leave free: the summary note and a (possibly cut) turn
        self.headroom = self.summary_tokens + min(64, budget_tokens // 4)
        self.max_tokens_seen = 0
        self.pruned_turns = 0  # evicted to fit the budget, over the memory's life
        self._pinned: list[dict] = []
        self._pinned_tokens = 0
        self._turns: list[_Turn] = []
        self._turn_tokens = 0
        self._seq = 0
        self._resets = 0
        self._reset_dropped = 0
        self._cut_renders = 0
        self._last_tokens = 0
        self._clear_summary(anchor=None)

    # ── building ─────────────────────────────────────────────────────────────────────────
    def pin(self, message: dict) -> None:
        """Keep `message` first, in pin order, for the memory's whole life."""
        _check_message(message, allow_system=True)
        tokens = self.count(message)
        if self._pinned_tokens + tokens > self.budget_tokens - self.headroom:
            raise MemoryBudgetError(
                f"the pinned messages take {self._pinned_tokens + tokens} tokens, but "
                f"budget_tokens={self.budget_tokens} must also leave {self.headroom} for the "
                "conversation: raise the memory budget or shorten the skill / task / slice block"
            )
        self._pinned.append(copy.deepcopy(message))
        self._pinned_tokens += tokens
        self._fit()

    def add_turn(
        self, messages: list[dict], importance: float = 1.0, note: str | None = None
    ) -> None:
        """Append one turn (assistant message + its tool results), then prune to the budget.

        `importance` > 1 keeps a turn longer, < 1 lets it go sooner (see the module doc);
        `note` is a short digest ("read rows 51-75") that the summary keeps once pruned.
        """
        msgs = _check_turn(messages)
        if not (isinstance(importance, int | float) and math.isfinite(importance)
                and importance >= 0):
            raise ValueError(f"importance must be a finite number >= 0, got {importance!r}")
        calls = Counter(
            (c.get("function") or {}).get("name") or "?"
            for m in msgs if m["role"] == "assistant" for c in m.get("tool_calls") or []
        )
        digest = " ".join(str(note).split())[:MAX_NOTE_CHARS] if note else None
        turn = _Turn(self._seq, msgs, float(importance), digest,
                     sum(self.count(m) for m in msgs), calls)
        self._seq += 1
        self._turns.append(turn)
        self._turn_tokens += turn.tokens
        self._fit()

    def reset(self, note: str) -> None:
        """Re-anchor: drop every unpinned turn; `note` becomes the summary."""
        self._resets += 1
        self._reset_dropped += len(self._turns)
        self._turns, self._turn_tokens = [], 0
        self._clear_summary(anchor=" ".join(str(note).split()) or "memory reset")

    # ── reading ──────────────────────────────────────────────────────────────────────────
    def messages(self) -> list[dict]:
        """Pinned + summary note + kept turns, as fresh copies, never over budget_tokens."""
        summary = self._summary_message()
        out = copy.deepcopy(self._pinned) + ([summary] if summary else [])
        fixed = self._pinned_tokens + (self.count(summary) if summary else 0)
        if fixed + self._turn_tokens <= self.budget_tokens or not self._turns:
            out += [copy.deepcopy(m) for t in self._turns for m in t.messages]
        else:  # only the newest turn is left (_fit saw to that), and it is too big
            last = self._turns[-1].messages
            cut = self._cut_turn(last, self.budget_tokens - fixed)
            if cut is None and summary:  # last resort: the summary shrinks to its counts
                summary = self._summary_message(minimal=True)
                fixed = self._pinned_tokens + self.count(summary)
                out[len(self._pinned)] = summary
                cut = self._cut_turn(last, self.budget_tokens - fixed)
            if cut is None:
                raise MemoryBudgetError(
                    f"the newest turn does not fit in budget_tokens={self.budget_tokens} even "
                    f"with its tool results and arguments cut ({len(last)} messages beside "
                    f"{self._pinned_tokens} pinned tokens): raise the memory budget"
                )
            self._cut_renders += 1
            out += cut
        total = sum(self.count(m) for m in out)
        self._last_tokens = total
        self.max_tokens_seen = max(self.max_tokens_seen, total)
        return out

    def stats(self) -> dict:
        return {
            "budget_tokens": self.budget_tokens,
            "pinned_tokens": self._pinned_tokens,
            "turns_added": self._seq,
            "turns_kept": len(self._turns),
            "kept_tokens": self._turn_tokens,
            "pruned_turns": self.pruned_turns,
            "resets": self._resets,
            "reset_dropped_turns": self._reset_dropped,
            "cut_renders": self._cut_renders,
            "last_tokens": self._last_tokens,
            "max_tokens_seen": self.max_tokens_seen,
        }

    # ── pruning ──────────────────────────────────────────────────────────────────────────
    def _rank(self, turn: _Turn) -> tuple[float, int]:
        """Lowest first out: log2 of the score, shifted by the newest seq (see module doc)."""
        if turn.importance == 0:
            return (-math.inf, turn.seq)
        return (turn.seq + self.half_life * math.log2(turn.importance), turn.seq)

    def _total(self) -> int:
        summary = self._summary_message()
        return self._pinned_tokens + (self.count(summary) if summary else 0) + self._turn_tokens

    def _fit(self) -> None:
        while len(self._turns) > 1 and self._total() > self.budget_tokens:
            victim = min(self._turns[:-1], key=self._rank)
            self._turns.remove(victim)
            self._turn_tokens -= victim.tokens
            self.pruned_turns += 1
            self._pruned += 1
            self._calls.update(victim.calls)
            if victim.note:
                bisect.insort(self._notes, (victim.seq, victim.note))
                if len(self._notes) > MAX_NOTES:
                    self._notes.pop(0)
                    self._notes_dropped += 1
            else:
                self._notes_dropped += 1
            self._summary_cache = None

    def _cut_turn(self, msgs: list[dict], available: int) -> list[dict] | None:
        """The turn with tool results cut (then other text and arguments) to fit, or None."""
        out = copy.deepcopy(msgs)
        tools = [m for m in out if m["role"] == "tool"]
        others = [m for m in out if m["role"] != "tool"]
        if self._cap(tools, _content_fields(tools), out, available):
            return out
        # still too big with every tool result reduced to its marker: cut the rest too
        for m in others:
            for call in m.get("tool_calls") or []:
                fn = call.setdefault("function", {})
                n = _chars(fn.get("arguments"))
                fn["arguments"] = json.dumps({"_memory": f"arguments cut ({n} chars)"})
        if self._cap(others, _content_fields(others), out, available):
            return out
        return None

    def _cap(self, targets: list[dict], originals: list[str], out, available) -> bool:
        """Binary-search the largest per-message char cap on targets' contents that fits."""
        def fits(cap: int) -> bool:
            for m, text in zip(targets, originals, strict=True):
                if text is not None:
                    m["content"] = _cut(text, cap)
            return sum(self.count(m) for m in out) <= available

        longest = max((len(t) for t in originals if t is not None), default=0)
        if fits(longest):
            return True
        if not fits(0):
            return False
        lo, hi = 0, longest  # fits(lo) is true, fits(hi) is false
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return fits(lo)

    # ── the summary note ─────────────────────────────────────────────────────────────────
    def _clear_summary(self, anchor: str | None) -> None:
        self._anchor = anchor
        self._pruned = 0  # since the last reset
        self._calls: Counter = Counter()
        self._notes: list[tuple[int, str]] = []
        self._notes_dropped = 0
        self._summary_cache: dict | None = None

    def _summary_message(self, minimal: bool = False) -> dict | None:
        if self._anchor is None and not self._pruned:
            return None
        if minimal:
            return {"role": "user", "content": self._summary_text([], 0, detail=False)}
        if self._summary_cache is None:
            notes = _collapse(n for _, n in self._notes)
            dropped = self._notes_dropped
            while True:  # drop the oldest digests until the note fits its own budget
                msg = {"role": "user", "content": self._summary_text(notes, dropped)}
                if self.count(msg) <= self.summary_tokens or not notes:
                    break
                dropped += notes[0][1]
                notes = notes[1:]
            if self.count(msg) > self.summary_tokens:
                msg = {"role": "user", "content": self._summary_text([], 0, detail=False)}
            self._summary_cache = msg
        return self._summary_cache

    def _summary_text(self, notes: list[tuple[str, int]], dropped: int, detail=True) -> str:
        parts = ["[memory]"]
        anchor = self._anchor
        if anchor:
            limit = max(40, self.summary_tokens * CHARS_PER_TOKEN // 2)
            parts.append(anchor if detail and len(anchor) <= limit else anchor[:limit] + "…")
        if self._pruned:
            n = self._pruned
            head = f"{n} earlier turn{'s' if n != 1 else ''} pruned to fit the context budget"
            if anchor:
                head = "Since then, " + head
            if detail and self._calls:
                head += " (tool calls: " + ", ".join(
                    f"{name} {k}" for name, k in sorted(self._calls.items())) + ")"
            parts.append(head + ".")
            if detail and (notes or dropped):
                shown = [f"{t} ×{k}" if k > 1 else t for t, k in notes]
                if dropped:
                    shown.insert(0, f"({dropped} older without detail)")
                parts.append("Oldest first: " + "; ".join(shown) + ".")
        return " ".join(parts)


# ── helpers ──────────────────────────────────────────────────────────────────────────────
def _cut(text: str, cap: int) -> str:
    if len(text) <= cap:
        return text
    return text[:cap] + MARKER.format(cut=len(text) - cap, total=len(text))


def _content_fields(msgs: list[dict]) -> list[str | None]:
    out = []
    for m in msgs:
        c = m.get("content")
        out.append(c if isinstance(c, str) else (None if c is None else json.dumps(c)))
    return out


def _collapse(notes: Iterable[str]) -> list[tuple[str, int]]:
    """Consecutive equal digests become one with a count."""
    out: list[tuple[str, int]] = []
    for n in notes:
        if out and out[-1][0] == n:
            out[-1] = (n, out[-1][1] + 1)
        else:
            out.append((n, 1))
    return out


def _check_message(message, *, allow_system: bool) -> None:
    if not isinstance(message, dict) or "role" not in message:
        raise ValueError(f"a message must be a dict with a 'role', got {message!r:.80}")
    roles = {"system", "user", "assistant", "tool"} - (set() if allow_system else {"system"})
    if message["role"] not in roles:
        raise ValueError(f"role {message['role']!r} is not allowed here (allowed: "
                         f"{', '.join(sorted(roles))}); pin system prompts")


def _check_turn(messages: list[dict]) -> list[dict]:
    """A deep copy of the turn, after checking every tool_call has its result and back."""
    msgs = list(messages or [])
    if not msgs:
        raise ValueError("a turn needs at least one message")
    declared: set[str] = set()
    answered: set[str] = set()
    for m in msgs:
        _check_message(m, allow_system=False)
        if m["role"] == "assistant":
            for call in m.get("tool_calls") or []:
                cid = call.get("id") if isinstance(call, dict) else None
                if not isinstance(cid, str) or cid in declared:
                    raise ValueError(f"tool_call ids must be unique strings, got {cid!r}")
                declared.add(cid)
        elif m["role"] == "tool":
            cid = m.get("tool_call_id")
            if cid not in declared - answered:
                raise ValueError(f"tool message {cid!r} answers no earlier tool_call of its turn")
            answered.add(cid)
    if declared - answered:
        raise ValueError(f"tool_calls without a tool result in the turn: "
                         f"{', '.join(sorted(declared - answered))}")
    return copy.deepcopy(msgs)
