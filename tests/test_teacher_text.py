"""The simulated teacher on the text kinds, over real HTTP through the official SDKs: answers
for generation (a headline from an article's body) and extraction (a JSON record), each
seeded fault on the first submission and the gold answer in the fix round, the rubric judge
and the pairwise comparison. The warehouse is a small SQLite table built from the real BBC
articles with a text gold column (`headline`) and a JSON gold column (`record`); the stand-in
agent gates answers with the real rules of agents/answers.py."""

from __future__ import annotations

import json
import re
from collections import Counter
from itertools import pairwise

import anthropic
import jsonschema
import openai
import pytest
import sqlalchemy as sa

from agents.answers import JsonAnswer, TextAnswer
from agents.teacher import TeacherConfig, TeacherKnobs, TeacherServer
from tests.teacher_helpers import Agent, anthropic_caller, logged, openai_caller

LABELS = ["business", "entertainment", "politics", "sports", "tech"]
RULES = {"min_words": 2, "max_words": 12, "min_chars": None, "max_chars": 80,
         "forbidden": [r'^\w+:\s*"'], "required": []}
SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["topic", "region", "words"],
          "properties": {"topic": {"type": "string", "enum": LABELS},
                         "region": {"type": "string"},
                         "words": {"type": "integer", "minimum": 0}}}
RUBRIC = {"criteria": [{"name": "faithful", "description": "Says only what the row says."},
                       {"name": "clear", "description": "Clear and specific."}],
          "threshold": 3.0}
GOLD_COLUMN = {"generation": "headline", "extraction": "record"}


@pytest.fixture(scope="module")
def text_warehouse(engine, tmp_path_factory) -> tuple[str, dict]:
    """28 real articles (every 7th row): id, body, headline (gold text), record (gold JSON
    text); the first row has no gold. Returns (url, {kind: {id: gold answer}})."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, title, body, topic, region, word_count FROM "
                                    "articles WHERE id % 7 = 0 ORDER BY id")).all()
    url = f"sqlite:///{tmp_path_factory.mktemp('text_wh') / 'warehouse.db'}"
    out = sa.create_engine(url)
    golds = {"generation": {}, "extraction": {}}
    with out.begin() as conn:
        conn.execute(sa.text("CREATE TABLE articles (id INTEGER PRIMARY KEY, body TEXT, "
                             "headline TEXT, record TEXT)"))
        for n, (i, title, body, topic, region, words) in enumerate(rows):
            record = {"topic": topic, "region": region, "words": words}
            if n == 0:  # no gold: the teacher cannot answer this row and skips it
                title, text = None, None
            else:
                text = json.dumps(record)
                golds["generation"][i], golds["extraction"][i] = title.strip(), record
            conn.execute(sa.text("INSERT INTO articles VALUES (:i, :b, :h, :r)"),
                         {"i": i, "b": body, "h": f"  {title} " if title else title, "r": text})
    out.dispose()
    return url, golds


@pytest.fixture(scope="module")
def text_engine(text_warehouse):
    engine = sa.create_engine(text_warehouse[0])
    yield engine
    engine.dispose()


@pytest.fixture
def text_teacher(text_warehouse, tmp_path):
    """text_teacher(kind, **knobs) -> a started TeacherServer for that kind; log at .log."""
    started = []

    def start(kind: str, **knobs) -> TeacherServer:
        knobs.setdefault("read_chars", None)
        log = tmp_path / f"requests-{len(started)}.jsonl"
        server = TeacherServer(TeacherConfig(
            text_warehouse[0], "articles", "id", GOLD_COLUMN[kind], kind=kind,
            knobs=TeacherKnobs(**knobs), request_log=str(log)))
        server.start()
        server.log = log
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def slice_opening(kind: str, page_size: int = 10) -> list[dict]:
    block = {"slice_id": "all", "table": "articles", "columns": ["id", "body"],
             "id_column": "id", "rows": 28, "page_size": page_size, "kind": kind,
             "answer_field": "response",
             **({"rules": RULES} if kind == "generation" else {"answer_schema": SCHEMA})}
    return [{"role": "system", "content": "Follow the skill.\n\n## Your task (pinned)\n"
             "Write the answer for each article."},
            {"role": "user", "content": "Write the answer for every row of your slice, "
             f"following the skill.\n<slice>\n{json.dumps(block)}\n</slice>"}]


class TextAgent(Agent):
    """The stand-in agent for a text kind: its gate checks each `response` with the real
    answer rule (the row's body is the prompt a copy is measured against)."""

    def __init__(self, engine, call, kind: str, page_size: int = 10, **kw):
        super().__init__(engine, call, page_size=page_size, **kw)
        self.pinned = slice_opening(kind, page_size)
        self.rule = JsonAnswer(SCHEMA) if kind == "extraction" else TextAnswer(
            min_words=RULES["min_words"], max_words=RULES["max_words"],
            max_chars=RULES["max_chars"], forbidden=tuple(RULES["forbidden"]))
        with engine.connect() as conn:
            self.bodies = dict(conn.execute(sa.text("SELECT id, body FROM articles")).all())

    def submit(self, arguments: str) -> dict:
        try:
            examples = self.parse(arguments)["examples"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            return self.error("invalid_arguments", f"not a submission: {e}")
        self.submitted.append(examples)
        accepted, rejected = 0, []
        for e in examples:
            row = int(e["row_id"])
            verdict = self.rule.check(e.get("response"), self.bodies[row], row)
            reason = verdict.reason if not verdict.ok else \
                "duplicate" if row in self.accepted else None
            if reason:
                self.rejected[reason] += 1
                rejected.append({"row_id": e["row_id"], "reason": reason,
                                 "message": verdict.message or reason})
            else:
                self.accepted[row] = verdict.answer
                accepted += 1
        return {"accepted": accepted, "rejected": rejected}

    def first_answers(self) -> dict:
        """Each row's answer in its first submission."""
        first = {}
        for batch in self.submitted:
            for e in batch:
                first.setdefault(int(e["row_id"]), e["response"])
        return first


def caller(sdk: str, server, **kw):
    return (openai_caller if sdk == "openai" else anthropic_caller)(server, **kw)


# ── answers ────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("kind", ["generation", "extraction"])
@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_honest_answers_are_the_gold(text_teacher, text_engine, text_warehouse, kind, sdk):
    server = text_teacher(kind)
    agent = TextAgent(text_engine, caller(sdk, server), kind).run()
    gold = text_warehouse[1][kind]
    assert agent.done and agent.accepted == gold and not agent.rejected
    assert sum(map(len, agent.submitted)) == len(gold)  # the row with no gold is skipped
    assert agent.tool_errors == 0 and agent.nudges == 0
    assert {x["kind"] for x in logged(server)} == {"label"}
    if kind == "generation":
        assert all(isinstance(v, str) for v in agent.first_answers().values())
    else:
        assert all(isinstance(v, dict) for v in agent.first_answers().values())


def _broken_json(value) -> bool:
    if not isinstance(value, str):
        return False
    try:
        json.loads(value)
    except json.JSONDecodeError:
        return True
    return False


@pytest.mark.parametrize("kind, knob, reason, shows", [
    ("generation", "too_long_rate", "too_long",
     lambda v, body: len(v.split()) > RULES["max_words"] or len(v) > RULES["max_chars"]),
    ("generation", "copy_prompt_rate", "copies_prompt",
     lambda v, body: 5 <= len(v.split()) <= 12 and body.startswith(v)),
    ("generation", "empty_answer_rate", "empty_answer", lambda v, body: v == ""),
    ("generation", "off_format_rate", "forbidden_pattern",
     lambda v, body: re.fullmatch(r'\w+: ".+"', v) is not None),
    ("extraction", "empty_answer_rate", "invalid_json", lambda v, body: v == ""),
    ("extraction", "off_format_rate", "schema_violation",
     lambda v, body: isinstance(v, dict) and not jsonschema.Draft202012Validator(
         SCHEMA).is_valid(v)),
    ("extraction", "broken_json_rate", "invalid_json", lambda v, body: _broken_json(v)),
])
def test_each_fault_hits_every_first_answer_and_the_fix_sends_the_gold(
        text_teacher, text_engine, text_warehouse, kind, knob, reason, shows):
    server = text_teacher(kind, **{knob: 1.0})
    agent = TextAgent(text_engine, openai_caller(server), kind).run()
    gold = text_warehouse[1][kind]
    first = agent.first_answers()
    assert set(first) == set(gold)
    assert all(shows(v, agent.bodies[i]) for i, v in first.items()), first
    assert agent.rejected == {reason: len(gold)}
    assert agent.accepted == gold and agent.done  # the fix round sent every gold answer
    fault = knob.removesuffix("_rate")
    assert server.stats()[f"style:{fault}"] == len(gold)


@pytest.mark.parametrize("kind, knob", [("generation", "broken_json_rate"),
                                        ("extraction", "too_long_rate"),
                                        ("extraction", "copy_prompt_rate")])
def test_a_fault_that_does_not_fit_the_kind_leaves_the_answer_honest(
        text_teacher, text_engine, text_warehouse, kind, knob):
    server = text_teacher(kind, **{knob: 1.0})
    agent = TextAgent(text_engine, openai_caller(server), kind).run()
    assert agent.accepted == text_warehouse[1][kind] and not agent.rejected


@pytest.mark.parametrize("kind", ["generation", "extraction"])
@pytest.mark.parametrize("knobs", [{"error_rate": 1.0},
                                   {"drift_after_calls": 0, "drift_error_rate": 1.0}])
def test_wrong_answers_are_well_formed(text_teacher, text_engine, text_warehouse, kind,
                                       knobs):
    server = text_teacher(kind, seed=2, **knobs)
    agent = TextAgent(text_engine, anthropic_caller(server), kind).run()
    gold = text_warehouse[1][kind]
    assert not agent.rejected and set(agent.accepted) == set(gold)  # the gate lets them by
    for i, answer in agent.accepted.items():
        assert answer != gold[i]
        if kind == "generation":  # another row's headline (pages here hold several rows)
            assert answer in set(gold.values()) - {gold[i]}
        else:  # one field changed, still valid
            assert sum(answer[k] != gold[i][k] for k in gold[i]) == 1
            jsonschema.validate(answer, SCHEMA)


@pytest.mark.parametrize("kind", ["generation", "extraction"])
def test_answers_are_seeded_and_survive_pruned_memory(text_teacher, text_engine, kind):
    knobs = {"error_rate": 0.2, "empty_answer_rate": 0.1, "off_format_rate": 0.1,
             "too_long_rate": 0.1, "broken_json_rate": 0.1, "prose_rate": 0.1,
             "malformed_rate": 0.1, "string_id_rate": 0.5, "multi_call_rate": 0.3,
             "think_rate": 0.5, "seed": 4}
    server = text_teacher(kind, **knobs)
    first = TextAgent(text_engine, openai_caller(server), kind).run(150)
    again = TextAgent(text_engine, anthropic_caller(server), kind, keep_last=1).run(150)
    assert first.done and again.done and first.accepted == again.accepted
    assert len(first.accepted) == 27 and sum(first.rejected.values()) > 0
    assert again.rejected["duplicate"] == 0


def _turn(text, name, arguments, result) -> list[dict]:
    return [{"role": "assistant", "content": text, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": name, "arguments": json.dumps(arguments)}}]},
            {"role": "tool", "tool_call_id": "c1", "content": json.dumps(result)}]


@pytest.mark.parametrize("kind", ["generation", "extraction"])
def test_the_fix_round_answers_fixable_rejections_with_the_gold(
        text_teacher, text_warehouse, kind):
    ask = openai_caller(text_teacher(kind, error_rate=1.0))
    gold = text_warehouse[1][kind]
    a, b, c = list(gold)[:3]
    note = '<progress>{"after_id": null, "last_id": 99, "short": false}</progress>'
    sent = [{"row_id": i, "response": "x"} for i in (a, b, c)]
    result = {"accepted": 0, "rejected": [
        {"row_id": a, "reason": "judge_disagreed", "message": "the judge scored it 2.0"},
        {"row_id": str(b), "reason": "near_duplicate", "message": "too close to row 1"},
        {"row_id": c, "reason": "duplicate", "message": "already accepted"}]}
    text, calls = ask(slice_opening(kind) + _turn(note, "submit_examples", {"examples": sent},
                                                  result))
    assert json.loads(calls[0][2]) == {"examples": [{"row_id": a, "response": gold[a]},
                                                    {"row_id": b, "response": gold[b]}]}
    assert '"fix": true' in text and "Resubmitting corrected 2 answers" in text


# ── the rubric judge ───────────────────────────────────────────────────────────────────────
def _review(kind, items, rules=None) -> str:
    block = {"kind": kind, "instructions": "Write a headline.", "rules": rules,
             "rubric": RUBRIC, "items": items}
    text = json.dumps(block).replace("</", "<\\/")  # as agents/judge.py escapes it
    return f"<review>{text}</review>"


SCORES = {"type": "object", "properties": {"verdicts": {"type": "array"}},
          "required": ["verdicts"]}


def _judge_openai(server, content) -> dict:
    reply = openai.OpenAI(base_url=server.base_url, api_key="k").chat.completions.create(
        model="m", messages=[{"role": "system", "content": "Score."},
                             {"role": "user", "content": content}],
        response_format={"type": "json_schema", "json_schema": {"name": "verdicts",
                                                                "schema": SCORES}})
    return json.loads(reply.choices[0].message.content)


def _judge_anthropic(server, content) -> dict:
    message = anthropic.Anthropic(base_url=server.url, api_key="k").messages.create(
        model="m", max_tokens=4096, system="Score.",
        messages=[{"role": "user", "content": content}],
        output_config={"format": {"type": "json_schema", "schema": SCORES}})
    return json.loads(message.content[0].text)


def _mean(verdict) -> float:
    return sum(verdict["scores"].values()) / len(verdict["scores"])


def test_rubric_judge_scores_against_the_gold(text_teacher, text_warehouse):
    server = text_teacher("generation")
    gold = text_warehouse[1]["generation"]
    ids = list(gold)
    items = [{"row_id": i, "answer": gold[i], "text": "..."} for i in ids[:10]]
    items += [{"row_id": i, "answer": gold[j], "text": "..."}  # another row's headline
              for i, j in pairwise(ids[10:21])]
    items += [{"row_id": ids[0], "answer": "", "text": "..."},
              {"row_id": ids[1], "answer": " ".join([gold[ids[1]]] * 10), "text": "..."},
              {"row_id": 999999, "answer": "Anything", "text": "..."}]
    content = _review("generation", items, RULES)
    verdicts = _judge_openai(server, content)["verdicts"]
    assert _judge_anthropic(server, content)["verdicts"] == verdicts
    assert [v["row_id"] for v in verdicts] == [it["row_id"] for it in items]
    assert all(set(v["scores"]) == {"faithful", "clear"} and v["reason"] for v in verdicts)
    assert all(v["scores"] == {"faithful": 5, "clear": 4} for v in verdicts[:10])
    assert all(_mean(v) < RUBRIC["threshold"] for v in verdicts[10:20])
    assert "another row" in verdicts[10]["reason"]
    empty, long, missing = verdicts[20:]
    assert empty["scores"] == long["scores"] == {"faithful": 1, "clear": 1}
    assert "empty" in empty["reason"] and "over the limit of 12" in long["reason"]
    assert missing == {"row_id": 999999, "scores": {"faithful": 3, "clear": 3},
                       "reason": "row not found"}
    assert {x["kind"] for x in logged(server)} == {"judge"}


def test_rubric_judge_on_records_and_its_errors(text_teacher, text_warehouse):
    gold = text_warehouse[1]["extraction"]
    ids = list(gold)[:6]
    items = [{"row_id": ids[0], "answer": gold[ids[0]], "text": "..."},
             {"row_id": ids[1], "answer": json.dumps(gold[ids[1]]), "text": "..."},
             {"row_id": ids[2], "answer": {**gold[ids[2]], "words": -1}, "text": "..."},
             {"row_id": ids[3], "answer": {"topic": "x", "region": "y", "words": -1},
              "text": "..."},
             {"row_id": ids[4], "answer": '{"topic": "busi', "text": "..."}]
    content = _review("extraction", items)
    honest = _judge_openai(text_teacher("extraction"), content)["verdicts"]
    assert [_mean(v) >= 3 for v in honest] == [True, True, True, False, False]
    assert honest[0]["scores"] == {"faithful": 5, "clear": 4}
    assert "words do not hold what the row says" in honest[2]["reason"]
    assert "not a JSON object" in honest[4]["reason"]
    wrong = _judge_openai(text_teacher("extraction", judge_error_rate=1.0), content)["verdicts"]
    assert [_mean(v) >= 3 for v in wrong] == [False, False, False, True, True]  # inverted
    for h, w in zip(honest, wrong, strict=True):
        step = -2 if _mean(h) >= 3 else 2
        assert w["scores"] == {k: min(5, max(1, s + step)) for k, s in h["scores"].items()}


def test_the_label_judge_is_unchanged_without_a_rubric(text_teacher, text_warehouse):
    server = text_teacher("generation")
    row = next(iter(text_warehouse[1]["generation"]))
    block = {"labels": LABELS, "items": [{"row_id": row, "label": "tech", "text": "..."}]}
    verdicts = _judge_openai(server, f"<review>{json.dumps(block)}</review>")["verdicts"]
    assert set(verdicts[0]) == {"row_id", "agree", "label"}


# ── pairwise comparison ────────────────────────────────────────────────────────────────────
def _compare(server, items, rules=None) -> list[dict]:
    block = {"instructions": None, "rules": rules, "rubric": RUBRIC, "items": items}
    reply = openai.OpenAI(base_url=server.base_url, api_key="k").chat.completions.create(
        model="m", messages=[{"role": "user", "content": f"<compare>{json.dumps(block)}"
                                                         "</compare>"}],
        response_format={"type": "json_schema", "json_schema": {"name": "preferences",
                                                                "schema": {"type": "object"}}})
    return json.loads(reply.choices[0].message.content)["preferences"]


def _pairs(gold: dict) -> list[dict]:
    """Each row's gold against another row's gold, in both positions."""
    ids, items = list(gold), []
    for n, (i, j) in enumerate(pairwise(ids[:13])):
        items += [{"id": f"{n}-gold-first", "row_id": i, "prompt": "...", "a": gold[i],
                   "b": gold[j]},
                  {"id": f"{n}-gold-second", "row_id": i, "prompt": "...", "a": gold[j],
                   "b": gold[i]}]
    return items


@pytest.mark.parametrize("kind", ["generation", "extraction"])
def test_compare_prefers_the_gold_in_both_positions(text_teacher, text_warehouse, kind):
    gold = text_warehouse[1][kind]
    items = _pairs(gold)
    prefs = _compare(text_teacher(kind), items, RULES if kind == "generation" else None)
    assert [p["id"] for p in prefs] == [it["id"] for it in items]
    assert [p["winner"] for p in prefs] == ["a", "b"] * 12
    assert all(p["reason"] for p in prefs)
    flipped = _compare(text_teacher(kind, judge_error_rate=1.0), items)
    assert [p["winner"] for p in flipped] == ["b", "a"] * 12


def test_compare_ties_rules_and_position_bias(text_teacher, text_warehouse):
    gold = text_warehouse[1]["generation"]
    i = next(iter(gold))
    items = [{"id": "same", "row_id": i, "prompt": "...", "a": gold[i], "b": gold[i]},
             {"id": "empty", "row_id": i, "prompt": "...", "a": "", "b": gold[i]},
             {"id": "lost", "row_id": 999999, "prompt": "...", "a": "word " * 30,
              "b": "A short headline"}]
    prefs = {p["id"]: p for p in _compare(text_teacher("generation"), items, RULES)}
    assert prefs["same"]["winner"] == "tie"
    assert prefs["empty"]["winner"] == "b" and "empty" in prefs["empty"]["reason"]
    assert prefs["lost"]["winner"] == "b"  # no gold: the rules decide (a is too long)
    biased = _compare(text_teacher("generation", judge_position_bias=1.0),
                      _pairs(gold) + items, RULES)
    assert {p["winner"] for p in biased} == {"a"}


def test_position_bias_is_a_seeded_share(text_teacher, text_warehouse):
    items = _pairs(text_warehouse[1]["generation"])
    server = text_teacher("generation", judge_position_bias=0.5, seed=7)
    prefs = _compare(server, items)
    biased = Counter(p["winner"] for p in prefs[1::2])  # the gold is b: "a" only by bias
    assert 2 <= biased["a"] <= 10 and _compare(server, items) == prefs


# ── configuration ──────────────────────────────────────────────────────────────────────────
def test_text_knobs_and_config(text_warehouse):
    realistic = TeacherKnobs(profile="realistic")
    assert (realistic.too_long_rate, realistic.broken_json_rate,
            realistic.judge_position_bias) == (0.03, 0.02, 0.05)
    assert TeacherKnobs().off_format_rate == 0
    with pytest.raises(ValueError, match="broken_json_rate \\+ error_rate must be at most 1"):
        TeacherKnobs(error_rate=0.5, too_long_rate=0.3, empty_answer_rate=0.3)
    url = text_warehouse[0]
    assert TeacherConfig(url, "articles", "id", "headline", kind="generation").labels == []
    with pytest.raises(ValueError, match="needs its label set"):
        TeacherConfig(url, "articles", "id", "headline")
    with pytest.raises(ValueError, match="kind must be one of"):
        TeacherConfig(url, "articles", "id", "headline", kind="summarise")


# ── the judges' clients through the gateway and both SDKs, against the teacher over HTTP ───────
@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_pairwise_judge_cancels_position_bias_by_showing_both_orders(
        text_teacher, text_warehouse, api):
    """The candidate is the gold headline, the other another article's: an honest judge says
    win on every row; a judge that always answers "a" (position bias) would hand the win to
    whichever answer comes first, so shown in both orders every row is a tie, never a win."""
    from agents.gateway import LLMGateway
    from agents.pairwise import PairwiseJudge
    from agents.provider_factory import make_provider
    from agents.skills import load_skill

    gold = text_warehouse[1]["generation"]
    ids = sorted(gold)
    rows = [{"row_id": i, "prompt": f"Article {i}"} for i in ids]
    candidate = [gold[i] for i in ids]
    other = [gold[ids[(n + 1) % len(ids)]] for n in range(len(ids))]

    def judged(**knobs) -> dict:
        server = text_teacher("generation", **knobs)
        url = server.base_url if api == "openai" else server.url
        gateway = LLMGateway(make_provider(api, base_url=url, api_key="k", timeout=10),
                             role="judge")
        return PairwiseJudge(gateway, model="simulated-judge", skill=load_skill(
            "compare-answers"), rules=RULES).compare(candidate, other, rows)

    honest = judged()
    assert (honest["wins"], honest["losses"], honest["ties"]) == (len(ids), 0, 0)
    assert honest["lower"] > 0.8 and honest["position_consistency"] == 1.0
    biased = judged(judge_position_bias=1.0)
    assert (biased["wins"], biased["losses"], biased["ties"]) == (0, 0, len(ids))
    assert biased["position_consistency"] == 0.0 and biased["unanswered"] == 0


def test_rubric_judge_rejects_another_rows_answer_with_its_reason(text_teacher,
                                                                   text_warehouse):
    from agents.gateway import LLMGateway
    from agents.judge import RubricJudge
    from agents.provider_factory import make_provider
    from agents.skills import load_skill

    gold = text_warehouse[1]["generation"]
    ids = sorted(gold)[:6]
    server = text_teacher("generation")
    judge = RubricJudge(
        LLMGateway(make_provider("anthropic", base_url=server.url, api_key="k", timeout=10),
                   role="judge"),
        model="simulated-judge", skill=load_skill("review-answers"), kind="generation",
        criteria=[{"name": "faithful", "description": "only what the article says"},
                  {"name": "clear", "description": "clear"}], threshold=3.0, rules=RULES)
    items = [{"row_id": i, "label": gold[i] if n % 2 == 0 else gold[ids[n - 1]],
              "text": f"body {i}"} for n, i in enumerate(ids)]
    verdicts = judge.review(items, agent="test", slice_id="s")
    assert [v.agree for v in verdicts] == [True, False] * 3
    assert all(v.reason and "scores faithful" in v.reason for v in verdicts)
