"""`posttrain validate`: ok for good specs; one exact line per problem, exit 2, no traceback."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from flows.spec import SpecError, load_spec

DEMO = Path(__file__).resolve().parent.parent / "examples" / "news_topics" / "spec.yaml"
GOOD = yaml.safe_load(DEMO.read_text())


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _broken(edit) -> dict:
    data = copy.deepcopy(GOOD)
    edit(data)
    return data


def test_demo_spec_is_valid(capsys):
    assert main(["validate", str(DEMO)]) == 0
    assert capsys.readouterr().out == "ok\n"


def test_relative_sqlite_url_resolves_against_spec_folder():
    spec = load_spec(DEMO)
    assert spec.warehouse.url == f"sqlite:///{DEMO.parent / 'warehouse.db'}"


BROKEN = {
    "zero_concurrency": (
        lambda d: d["generation"].update(concurrency=0),
        ["generation.concurrency: must be at least 1, got 0"],
    ),
    "unknown_key": (
        lambda d: d["training"].update(max_seq_length=128),
        ["training.max_seq_length: unknown key, remove it or check its spelling"],
    ),
    "unknown_section": (
        lambda d: d.update(trainer={"steps": 3}),
        ["trainer: unknown key, remove it or check its spelling"],
    ),
    "missing_tracking": (
        lambda d: d.pop("tracking"),
        ["tracking: required, add it"],
    ),
    "url_without_scheme": (
        lambda d: d["warehouse"].update(url="warehouse.db"),
        ["warehouse.url: must be a SQLAlchemy URL like sqlite:///path.db, got 'warehouse.db'"],
    ),
    "one_label": (
        lambda d: d["task"].update(labels=["tech"]),
        ["task.labels: must list at least 2 labels, got 1"],
    ),
    "duplicate_labels": (
        lambda d: d["task"].update(labels=["tech", "sports", "tech"]),
        ["task.labels: labels must be unique, tech repeated"],
    ),
    "gold_column_allow_listed": (
        lambda d: d["warehouse"]["tables"]["articles"].append("topic"),
        [("task.gold_column: 'topic' is allow-listed in warehouse.tables.articles: remove it "
         "there, agents must never read the gold label")],
    ),
    "slice_table_not_allowed": (
        lambda d: d["slicing"].update(table="users"),
        ["slicing.table: must be one of the allow-listed tables (articles), got 'users'"],
    ),
    "group_by_without_column": (
        lambda d: d["slicing"].pop("column"),
        ["slicing.column: required when method is group_by"],
    ),
    "bad_slicing_method": (
        lambda d: d["slicing"].update(method="random"),
        ["slicing.method: must be one of 'group_by' or 'hash', got 'random'"],
    ),
    "template_uses_hidden_column": (
        lambda d: d["task"].update(prompt_template="Text: {body}\nGold: {topic}\nTopic:"),
        ["task.prompt_template: uses topic, not allow-listed columns of 'articles'"],
    ),
    "template_unbalanced_brace": (
        lambda d: d["task"].update(prompt_template="Title: {title\nTopic:"),
        ["task.prompt_template: is not a valid format string (unmatched '{' in format spec)"],
    ),
    "unknown_accelerate_profile": (
        lambda d: d["training"].update(accelerate_profile="tpu"),
        [("training.accelerate_profile: must be one of cpu, cpu_ddp, deepspeed_zero3, fsdp, "
         "multi_gpu, multi_node, single_gpu, got 'tpu'")],
    ),
    "holdout_out_of_range": (
        lambda d: d["evaluation"].update(holdout_fraction=1.5),
        ["evaluation.holdout_fraction: must be less than 1.0, got 1.5"],
    ),
    "heads_do_not_divide_hidden": (
        lambda d: d["student"]["tiny"].update(hidden_size=130),
        ["student.tiny.hidden_size: must be a multiple of num_heads (4), got 130"],
    ),
    "negative_learning_rate": (
        lambda d: d["training"].update(learning_rate=-0.1),
        ["training.learning_rate: must be greater than 0.0, got -0.1"],
    ),
    "two_problems_at_once": (
        lambda d: (d["generation"].update(max_turns=0),
                   d["llm"]["simulated"].update(error_rate=2)),
        ["llm.simulated.error_rate: must be at most 1.0, got 2",
         "generation.max_turns: must be at least 1, got 0"],
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_spec_names_field_and_fix(case, tmp_path, capsys):
    edit, expected = BROKEN[case]
    path = _write(tmp_path, _broken(edit))
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().out.splitlines() == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: [unclosed\n", "not valid YAML at line 2, column 1"),
        ("- just\n- a list\n", "(top level): must be a mapping of sections, got list"),
    ],
)
def test_unreadable_spec(text, expected, tmp_path, capsys):
    path = _write(tmp_path, text)
    assert main(["validate", str(path)]) == 2
    out = capsys.readouterr().out
    assert expected in out and "Traceback" not in out


def test_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().out == f"{tmp_path / 'nope.yaml'}: no such spec file\n"


@pytest.mark.skipif(shutil.which("posttrain") is None and not
                    (Path(sys.executable).parent / "posttrain").exists(),
                    reason="console script not installed (pip install -e .)")
def test_console_script_exit_code_and_no_traceback(tmp_path):
    exe = shutil.which("posttrain") or str(Path(sys.executable).parent / "posttrain")
    path = _write(tmp_path, _broken(lambda d: d["generation"].update(concurrency=0)))
    proc = subprocess.run([exe, "validate", str(path)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 2
    assert proc.stdout == "generation.concurrency: must be at least 1, got 0\n"
    assert "Traceback" not in proc.stderr


def test_readme_shows_the_demo_spec_verbatim():
    readme = (DEMO.parent.parent.parent / "README.md").read_text()
    block = readme.split("The demo spec, complete:\n\n```yaml\n", 1)[1].split("\n```", 1)[0]
    assert block == DEMO.read_text().rstrip("\n")
    assert main(["validate", str(DEMO)]) == 0


def test_the_old_drift_keys_name_their_replacement(tmp_path):
    path = _write(tmp_path, _broken(lambda d: d["generation"].update(drift_threshold=0.25)))
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert e.value.problems[0].startswith("generation.drift_threshold: was replaced by "
                                          "generation.drift")


def test_drift_settings_are_checked(tmp_path):
    path = _write(tmp_path, _broken(lambda d: d["generation"].update(
        drift={"baseline_rate": 0.4, "max_baseline_rate": 0.2})))
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert e.value.problems == [("generation.drift.max_baseline_rate: must be >= baseline_rate "
                                "(0.4), got 0.2")]


# ── text kinds: every field of the task names itself when wrong ──────────────────────────────
HEADLINES = DEMO.parent.parent / "news_headlines" / "spec.yaml"
TEXT = yaml.safe_load(HEADLINES.read_text())


def _text(edit) -> dict:
    data = copy.deepcopy(TEXT)
    data["warehouse"]["url"] = f"sqlite:///{DEMO.parent / 'warehouse.db'}"
    edit(data)
    return data


def _schema(d):
    d["task"].update(kind="extraction", answer_schema={"type": "object",
                                                       "properties": {"a": {"type": "nope"}}})
    d["task"].pop("rules")
    d["evaluation"]["promotion"]["metric"] = "field_f1"


TEXT_BROKEN = {
    "labels_on_generation": (lambda d: d["task"].update(labels=["a", "b"]),
                             "task.labels: is not used by kind generation: remove it"),
    "bounds_crossed": (lambda d: d["task"]["rules"].update(min_words=20),
                       "task.rules.min_words: 20 is more than max_words 12"),
    "bad_pattern": (lambda d: d["task"]["rules"].update(forbidden=["(unclosed"]),
                    ("task.rules.forbidden: '(unclosed' is not a valid regular "
                    "expression (missing ), unterminated subpattern at position 0)")),
    "rubric_threshold": (lambda d: d["task"]["rubric"].update(threshold=7),
                         "task.rubric.threshold: must be at most 5.0, got 7"),
    "rubric_name": (lambda d: d["task"]["rubric"]["criteria"][0].update(name="not ok"),
                    ("task.rubric.criteria.0.name: must be a plain identifier "
                    "(letters, digits, _), got 'not ok'")),
    "metric_of_other_kind": (lambda d: d["evaluation"]["promotion"].update(metric="accuracy"),
                             ("evaluation.promotion.metric: must be one of rouge_l, chrf for "
                             "kind generation, got 'accuracy'")),
    "no_judge": (lambda d: d["llm"].update(judge=None),
                 ("llm.judge: a generation task needs a judge: it scores answers against "
                 "task.rubric and compares models on the held-out rows")),
    "simulated_without_gold": (lambda d: d["task"].pop("gold_column"),
                               ("task.gold_column: the simulated teacher answers from the gold "
                               "column: name one, or use real LLM endpoints")),
    "extraction_without_schema": (
        lambda d: (d["task"].update(kind="extraction"), d["task"].pop("rules")),
        "task.answer_schema: required for kind extraction, add it"),
    "extraction_bad_schema": (_schema, ("task.answer_schema: is not a valid JSON "
                              "Schema at properties/a/type: 'nope' is not valid under any of "
                              "the given schemas")),
    "label_balance_on_text": (lambda d: d["distribution"].update(target="uniform"),
                              ("distribution.target: balances labels, which a generation task "
                              "has none of: set it to none (answer lengths are reported by "
                              "task.rules)")),
}


def test_the_headlines_spec_is_valid():
    spec = load_spec(HEADLINES)
    assert spec.task.kind == "generation" and spec.task.skill == "write-responses"
    assert spec.task.labels is None and spec.task.rules.max_words == 12
    assert [c.name for c in spec.task.rubric.criteria] == ["faithful", "specific", "style"]
    assert spec.evaluation.promotion.metric == "rouge_l"


@pytest.mark.parametrize("case", sorted(TEXT_BROKEN))
def test_broken_text_task_names_its_field(case, tmp_path, capsys):
    edit, expected = TEXT_BROKEN[case]
    path = _write(tmp_path, _text(edit))
    assert main(["validate", str(path)]) == 2
    assert expected in capsys.readouterr().out.splitlines()


def test_a_generation_task_gets_the_kinds_defaults(tmp_path):
    data = _text(lambda d: (d["task"].pop("rubric"), d["task"].pop("skill", None),
                            d["evaluation"]["promotion"].pop("metric")))
    spec = load_spec(_write(tmp_path, data))
    assert [c.name for c in spec.task.rubric.criteria] == ["faithful", "follows_instructions",
                                                           "clear"]
    assert spec.task.rubric.threshold == 3.0 and spec.evaluation.promotion.metric == "rouge_l"
