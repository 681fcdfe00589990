"""The read-only SQL tool on the shared SQLite warehouse: an agent sees only its slice and the
allowed columns, rows are capped, its CTEs merge after the slice's, every rejection says what
to change, and misuse is counted. (Both backends, the hostile corpus and the hardened
connection: tests/test_sql_tool_backends.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from agents.sql_tool import ScopedTable, SQLRejected, SQLTool
from tests.sql_tool_helpers import COLUMNS


# ── the basic tool, on the shared SQLite warehouse ──────────────────────────────────────
@pytest.fixture(scope="module")
def europe_ids(engine) -> list[int]:
    with engine.connect() as conn:
        q = sa.text("SELECT id FROM articles WHERE region = 'europe' ORDER BY id")
        return [r[0] for r in conn.execute(q)]


@pytest.fixture
def tool(engine) -> SQLTool:
    scoped = ScopedTable(
        "articles", COLUMNS, "SELECT * FROM articles WHERE region = :r", {"r": "europe"}, "id"
    )
    return SQLTool(engine, scoped, row_limit=20)


def test_sees_only_its_slice_and_allowed_columns(tool, europe_ids):
    assert tool.run("SELECT count(*) AS n FROM articles")["rows"] == [{"n": len(europe_ids)}]
    page = tool.run("SELECT * FROM articles ORDER BY id LIMIT 5 OFFSET 3")
    assert [r["id"] for r in page["rows"]] == europe_ids[3:8]
    assert set(page["rows"][0]) == set(COLUMNS)  # `*` never shows the gold column
    assert {r["region"] for r in page["rows"]} == {"europe"}


def test_row_limit_truncates(tool, europe_ids):
    assert len(europe_ids) > 20
    res = tool.run("SELECT id FROM articles")
    assert res["row_count"] == 20 and res["truncated"] is True
    res = tool.run("SELECT id FROM articles ORDER BY id LIMIT 7")
    assert res["row_count"] == 7 and res["truncated"] is False
    res = tool.run("SELECT id FROM articles UNION SELECT id FROM articles ORDER BY 1 LIMIT 500")
    assert res["row_count"] == 20 and res["truncated"] is True


def test_agent_ctes_merge_after_the_slice(tool, europe_ids):
    res = tool.run(
        "WITH recent AS (SELECT id, published_at AS day FROM articles) "
        "SELECT count(*) AS n FROM recent r JOIN articles a ON a.id = r.id"
    )
    assert res["rows"] == [{"n": len(europe_ids)}]
    built = tool.build("WITH x AS (SELECT id FROM articles) SELECT * FROM x")
    assert built.startswith("WITH _pt_slice_") and ", x AS (SELECT id FROM _pt_slice_" in built
    assert tool.build("SELECT 1") != tool.build("SELECT 1")  # a fresh CTE name every time


def test_colons_in_agent_literals_do_not_bind(tool):
    res = tool.run("SELECT '10:30' AS t, id FROM articles WHERE title <> ':r' LIMIT 1")
    assert res["rows"][0]["t"] == "10:30"


@pytest.mark.parametrize(
    "sql, says",
    [
        ("SELECT topic FROM articles", "column 'topic' is not readable"),
        ('SELECT "TOPIC" FROM articles', "is not readable"),
        ("SELECT id FROM articles WHERE topic = 'tech'", "column 'topic'"),
        ("DELETE FROM articles", "only SELECT queries are allowed; got DELETE"),
        ("UPDATE articles SET title = 'x'", "only SELECT"),
        ("DROP TABLE articles", "only SELECT"),
        ("INSERT INTO articles SELECT * FROM articles", "only SELECT"),
        ("WITH d AS (DELETE FROM articles RETURNING id) SELECT * FROM d", "DELETE is not allowed"),
        ("SELECT 1; SELECT 2", "exactly one SQL statement, got 2"),
        ("SELECT id FROM articles; DROP TABLE articles", "exactly one"),
        ("SELECT * FROM sqlite_master", "table 'sqlite_master' is not readable"),
        ("SELECT * FROM users", "table 'users' is not readable"),
        ("SELECT * FROM main.articles", "qualified table names"),
        ("SELECT * FROM pragma_table_info('articles')", "table-valued functions"),
        ("SELECT load_extension('x')", "load_extension"),
        ("SELECT id FROM articles WHERE id = :x", "bind parameters"),
        ("VACUUM INTO '/tmp/x.db'", "only SELECT"),
        ("ATTACH DATABASE '/tmp/x.db' AS x", "only SELECT"),
        ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT n FROM r",
         "recursive"),
        ("WITH articles AS (SELECT 1 AS id) SELECT * FROM articles", "may not be named"),
        ("", "empty"),
        ("SELEC id FROM", "does not parse"),
    ],
)
def test_rejections_say_what_to_change(tool, sql, says):
    with pytest.raises(SQLRejected) as info:
        tool.run(sql)
    assert says in info.value.reason


def test_lookup_row(tool, europe_ids):
    row = tool.lookup_row(europe_ids[0])
    assert row["id"] == europe_ids[0] and "topic" not in row
    assert tool.lookup_row(str(europe_ids[0]))["id"] == europe_ids[0]
    with tool.engine.connect() as conn:
        outsider = conn.execute(sa.text("SELECT id FROM articles WHERE region = 'uk'")).scalar()
    assert tool.lookup_row(outsider) is None
    assert tool.lookup_row(10**9) is None


def test_scoped_table_validates_identifiers():
    with pytest.raises(ValueError, match="id_column"):
        ScopedTable("articles", ["title"], "SELECT title FROM articles", {}, "id")
    with pytest.raises(ValueError, match="plain SQL identifier"):
        ScopedTable("articles; drop", ["id"], "SELECT id FROM articles", {}, "id")


def test_stats_count_tool_misuse(tool):
    tool.run("SELECT id FROM articles LIMIT 1")
    for sql in ("DELETE FROM articles", "SELECT topic FROM articles", "SELECT topic FROM x"):
        with pytest.raises(SQLRejected):
            tool.run(sql)
    assert tool.stats == {"executed": 1, "rejected": 3, "failed": 0,
                          "by_code": {"not_select": 1, "column": 1, "table": 1}}


def test_unsupported_dialects_are_refused():
    engine = SimpleNamespace(dialect=SimpleNamespace(name="mysql"))
    with pytest.raises(ValueError, match="no hardened connection"):
        SQLTool(engine, ScopedTable("articles", ["id"], "SELECT id FROM articles"))


# ── what a result may show: long values cut with a marker, the result bounded ───────────
def test_long_values_are_cut_with_a_marker_and_results_bounded(engine, europe_ids):
    """The defaults keep every article whole; smaller caps cut each long value with a marker
    that says how much and how to read the rest, and leave rows out past the result's cap
    (marked truncated, with a note). Rows the pipeline reads itself are never cut."""
    from agents.sql_tool import CUT_MARK, MAX_CELL_CHARS

    scoped = ScopedTable("articles", COLUMNS, "SELECT * FROM articles WHERE region = :r",
                         {"r": "europe"}, "id")
    whole = SQLTool(engine, scoped, row_limit=200).run("SELECT id, body FROM articles")
    longest = max(len(r["body"]) for r in whole["rows"])
    assert "cut" not in whole and longest < MAX_CELL_CHARS  # nothing cut by the defaults
    tool = SQLTool(engine, scoped, row_limit=200, max_cell_chars=100, max_result_chars=2000)
    res = tool.run("SELECT id, body FROM articles ORDER BY id")
    first = whole["rows"][0]["body"]
    assert res["rows"][0]["body"] == first[:100] + CUT_MARK.format(
        cut=len(first) - 100, total=len(first), column="body", start=101)
    assert res["truncated"] and 0 < res["row_count"] < len(europe_ids)
    assert len(str(res["rows"])) < 2000 + 300  # the rows kept fit the cap (+ JSON framing)
    assert "values longer than 100 characters were cut" in res["cut"]
    assert "more rows were left out" in res["cut"]
    assert tool.stats["cut_values"] == res["row_count"]
    assert tool.stats["cut_rows"] == len(europe_ids) - res["row_count"]
    rest = tool.run(f"SELECT substr(body, 101, 50) AS more FROM articles WHERE id = "
                    f"{europe_ids[0]}")
    assert rest["rows"][0]["more"] == first[100:150] and "cut" not in rest
    assert tool.lookup_row(europe_ids[0])["body"] == first  # trusted reads stay whole
    one = SQLTool(engine, scoped, max_result_chars=10).run("SELECT id, title FROM articles")
    assert one["row_count"] == 1 and one["truncated"]  # at least one row, always
    with pytest.raises(ValueError, match="max_cell_chars"):
        SQLTool(engine, scoped, max_cell_chars=0)
