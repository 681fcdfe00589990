"""The gate's near-duplicate check (Gate(..., near_duplicates=NearDuplicates(...))): an answer
near-identical to one accepted for ANOTHER row is rejected with a message naming that row,
the first of two in one batch wins, forget() revokes an answer, and without an index the gate
behaves as before."""

from __future__ import annotations

from agents.answers import NEAR_DUPLICATE, OFF_SPEC, JsonAnswer, TextAnswer
from agents.gates import DUPLICATE, Gate
from agents.text_diversity import NearDuplicates

RULE = TextAnswer(min_words=3, max_words=30)
ROWS = {str(i): {"id": i, "body": f"article {i}"} for i in range(1, 10)}
ROWS["a7"] = {"id": "a7", "body": "article a7"}
HEADLINE = "Carmaker shares jump after record quarterly profits beat forecasts"
NEAR = "Carmaker shares jump after record quarterly profits beat expectations"  # 6/8 = 75%
OTHER = "Heavy rain expected across the north of the country this weekend"


def lookup(ids):
    return {str(i): ROWS[str(i)] for i in ids if str(i) in ROWS}


def test_near_duplicate_is_an_off_spec_reason():
    assert NEAR_DUPLICATE == "near_duplicate" and NEAR_DUPLICATE in OFF_SPEC


def test_the_second_of_two_near_duplicates_in_a_batch_is_rejected_naming_the_first():
    gate = Gate(RULE, near_duplicates=NearDuplicates(threshold=0.7))
    results = gate.check_batch([
        {"row_id": 7, "response": HEADLINE},
        {"row_id": 2, "response": NEAR},
        {"row_id": 3, "response": OTHER},
    ], lookup)
    assert [r.reason for r in results] == [None, NEAR_DUPLICATE, None]
    assert results[1].message == (
        f'row 2: your answer is 75% the same as the one accepted for row 7 ("{HEADLINE}"): '
        f"write an answer specific to this row")
    assert results[1].row_id == 2 and results[1].label == NEAR and results[1].row is None
    assert gate.accepted_count == 2
    # the rejected row was not accepted: it can be answered again, specifically
    again = gate.check_batch([{"row_id": 2, "response": "Profits warning hits retailer"}],
                             lookup)
    assert again[0].ok


def test_forget_takes_the_answer_out_of_the_index():
    index = NearDuplicates(threshold=0.7)
    gate = Gate(RULE, near_duplicates=index)
    assert gate.check({"row_id": 1, "response": HEADLINE}, lambda i: ROWS.get(str(i))).ok
    blocked = gate.check({"row_id": 2, "response": HEADLINE}, lambda i: ROWS.get(str(i)))
    assert blocked.reason == NEAR_DUPLICATE and "100% the same" in blocked.message
    gate.forget(1)
    assert len(index) == 0
    assert gate.check({"row_id": 2, "response": HEADLINE}, lambda i: ROWS.get(str(i))).ok
    assert gate.check({"row_id": 1, "response": HEADLINE},
                      lambda i: ROWS.get(str(i))).reason == NEAR_DUPLICATE
    gate.forget(999)  # never accepted: nothing to remove


def test_the_other_answer_is_quoted_clipped_and_its_row_shown_as_submitted():
    long_answer = ("The central bank held interest rates steady on Thursday while warning that "
                   "inflation could stay above its target for longer than markets expect")
    gate = Gate(RULE, near_duplicates=NearDuplicates())
    first, second = gate.check_batch([{"row_id": "a7", "response": long_answer},
                                      {"row_id": 4, "response": long_answer + " today"}], lookup)
    assert first.ok and second.reason == NEAR_DUPLICATE
    assert "accepted for row 'a7' (\"The central bank held interest rates steady" in \
        second.message
    quoted = second.message.split('("')[1].split('")')[0]
    assert len(quoted) <= 80 and quoted.endswith("…")


def test_same_row_resubmitted_is_still_a_duplicate_not_a_near_duplicate():
    gate = Gate(RULE, near_duplicates=NearDuplicates())
    results = gate.check_batch([{"row_id": 1, "response": HEADLINE},
                                {"row_id": 1, "response": HEADLINE}], lookup)
    assert [r.reason for r in results] == [None, DUPLICATE]


def test_without_an_index_the_gate_accepts_repeated_answers_as_before():
    gate = Gate(RULE)
    results = gate.check_batch([{"row_id": i, "response": HEADLINE} for i in (1, 2, 3)], lookup)
    assert all(r.ok for r in results) and gate.accepted_count == 3


def test_extraction_answers_are_compared_as_canonical_json():
    schema = {"type": "object", "properties": {"company": {"type": "string"},
                                               "change": {"type": "string"}}}
    gate = Gate(JsonAnswer(schema), near_duplicates=NearDuplicates(threshold=0.95))
    results = gate.check_batch([
        {"row_id": 1, "response": {"company": "Acme", "change": "up"}},
        {"row_id": 2, "response": '{"change": "up", "company": "Acme"}'},
        {"row_id": 3, "response": {"company": "Zenith Foods", "change": "down"}},
    ], lookup)
    assert [r.reason for r in results] == [None, NEAR_DUPLICATE, None]
    assert 'row 1 ("{"change": "up", "company": "Acme"}")' in results[1].message


def test_the_same_answer_for_the_same_prompt_is_not_recycled():
    """A warehouse that holds one article twice: both rows rightly get the same headline (the
    exact-duplicate pass of curation keeps one); another article with it is rejected."""
    rows = {"1": {"id": 1, "body": "one article"}, "2": {"id": 2, "body": "one article"},
            "3": {"id": 3, "body": "another article"}}
    gate = Gate(RULE, prompt_of=lambda row: f"Article: {row['body']}\nHeadline:",
                near_duplicates=NearDuplicates(threshold=0.8))
    results = gate.check_batch([{"row_id": i, "response": HEADLINE} for i in (1, 2, 3)],
                               lambda ids: {str(i): rows[str(i)] for i in ids})
    assert [r.reason for r in results] == [None, None, NEAR_DUPLICATE]
