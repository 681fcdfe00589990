"""Layer 1 alone: `agents.sql_guard.check` on the hostile corpus and on ordinary queries.

No database here; tests/test_sql_tool_backends.py runs the same corpus against real SQLite and
PostgreSQL warehouses, with and without the guard."""

from __future__ import annotations

import pytest
import sqlglot

from agents.sql_allowlist import ALLOWED_FUNCTIONS, CODES
from agents.sql_guard import SQLRejected, check, check_tree
from tests.sql_hostile import HOSTILE

TABLES = {"articles": ["id", "title", "body", "published_at", "region", "word_count"]}
DIALECTS = ["sqlite", "postgresql"]

# Ordinary read-only queries an agent writes; each must pass on both dialects.
LEGIT = [
    "SELECT count(*) AS n FROM articles",
    "SELECT region, count(*) AS n FROM articles GROUP BY region HAVING count(*) > 1 ORDER BY n",
    "SELECT id, title FROM articles WHERE id > 40 ORDER BY id LIMIT 10 OFFSET 20",
    "SELECT id, lower(substr(title, 1, 10)) AS t, length(body) AS l FROM articles",
    ("SELECT CASE WHEN word_count > 300 THEN 'long' ELSE 'short' END AS k, count(*) AS n "
    "FROM articles GROUP BY 1 ORDER BY 1"),
    ("WITH long AS (SELECT id, word_count FROM articles WHERE word_count > 300) "
    "SELECT count(*) AS n FROM long"),
    "WITH a AS (SELECT id FROM articles), b AS (SELECT id FROM a) SELECT count(*) FROM b",
    "SELECT id FROM articles WHERE word_count = (SELECT max(word_count) FROM articles)",
    "SELECT id FROM articles WHERE id IN (SELECT id FROM articles WHERE region = 'europe')",
    "SELECT avg(word_count) AS a, sum(word_count) AS s, min(id), max(id) FROM articles",
    "SELECT coalesce(title, ''), nullif(region, 'uk'), replace(title, 'a', 'b') FROM articles",
    "SELECT row_number() OVER (PARTITION BY region ORDER BY id) AS rn FROM articles",
    "SELECT id FROM articles UNION SELECT id FROM articles EXCEPT SELECT id FROM articles",
    "SELECT id FROM articles INTERSECT SELECT id FROM articles WHERE word_count > 100",
    "SELECT * FROM (SELECT * FROM articles) AS t WHERE t.id > 3",  # `*` is the slice view
    "SELECT a.id, b.title FROM articles AS a JOIN articles AS b ON a.id = b.id",
    "SELECT articles.id FROM articles LEFT JOIN articles AS x USING (id)",
    "SELECT id FROM articles WHERE title LIKE '%a%' AND region IS NOT NULL",
    "SELECT id FROM articles WHERE published_at BETWEEN '2004-01-01' AND '2004-12-31'",
    "SELECT EXISTS (SELECT 1 FROM articles WHERE id = 3) AS e",
    "SELECT CAST(id AS TEXT) || ':' || title AS label FROM articles",
    "SELECT 'it''s; DROP TABLE articles --' AS harmless_literal",
    "SELECT id FROM articles; -- a trailing ';' and comment are fine",
    'SELECT "title" FROM articles',
    "SELECT Title, ID FROM articles",  # unquoted names fold in both dialects
]


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("case", HOSTILE, ids=[repr(h.sql[:60]) for h in HOSTILE])
def test_every_hostile_query_is_rejected(case, dialect):
    with pytest.raises(SQLRejected) as info:
        check(case.sql, TABLES, dialect)
    assert info.value.code == case.code_for(dialect), info.value.reason
    assert info.value.code in CODES and info.value.reason


def test_the_corpus_is_large_and_covers_every_kind():
    assert len(HOSTILE) >= 40
    codes = {h.code for h in HOSTILE} | {h.pg_code for h in HOSTILE if h.pg_code}
    assert codes == set(CODES) - {"timeout"}  # timeouts come from the connection layer


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("sql", LEGIT)
def test_ordinary_queries_pass_and_get_a_limit(sql, dialect):
    out = check(sql, TABLES, dialect, row_limit=50)
    tree = sqlglot.parse_one(out, read="postgres" if dialect == "postgresql" else dialect)
    assert tree.args["limit"] is not None
    assert not any(node.comments for node in tree.walk())  # comments never reach the database


@pytest.mark.parametrize(
    "sql, limit",
    [
        ("SELECT id FROM articles", "LIMIT 50"),
        ("SELECT id FROM articles LIMIT 7", "LIMIT 7"),
        ("SELECT id FROM articles LIMIT 500", "LIMIT 50"),
        ("SELECT id FROM articles UNION SELECT id FROM articles LIMIT 900", "LIMIT 50"),
        ("SELECT id FROM articles LIMIT 10 OFFSET 5", "LIMIT 10 OFFSET 5"),
    ],
)
def test_limit_is_the_smaller_of_the_query_and_the_cap(sql, limit):
    assert check(sql, TABLES, "sqlite", row_limit=50).endswith(limit)


def test_computed_or_negative_limits_are_capped_outside():
    # SQLite reads LIMIT -1 as "no limit"
    out = check("SELECT id FROM articles LIMIT -1", TABLES, "sqlite", row_limit=50)
    assert out.endswith(") AS _pt_q LIMIT 50")
    out = check("SELECT id FROM articles LIMIT (SELECT 9)", TABLES, "postgresql", row_limit=5)
    assert out.endswith("LIMIT 5")


def test_identifiers_follow_the_dialect_not_lowercasing():
    # SQLite ignores case even in quotes; PostgreSQL folds unquoted names and keeps quoted ones
    check('SELECT "TITLE" FROM articles', TABLES, "sqlite")
    with pytest.raises(SQLRejected) as info:
        check('SELECT "TITLE" FROM articles', TABLES, "postgresql")
    assert info.value.code == "column" and "case-sensitive" in info.value.reason
    check("SELECT TITLE FROM ARTICLES", TABLES, "postgresql")
    mixed = {"Articles": ["Id", "Title"]}  # real mixed-case names in PostgreSQL
    check('SELECT "Title" FROM "Articles"', mixed, "postgresql")
    for bad in ('SELECT title FROM "Articles"', 'SELECT "Title" FROM articles'):
        with pytest.raises(SQLRejected):
            check(bad, mixed, "postgresql")


def test_qualifiers_must_be_tables_or_aliases_of_the_query():
    check("SELECT articles.id, a.title FROM articles JOIN articles AS a ON a.id = articles.id",
          TABLES, "sqlite")
    check("WITH w AS (SELECT id FROM articles) SELECT w.id FROM w", TABLES, "sqlite")
    for sql in ("SELECT x.id FROM articles", "SELECT main.articles.id FROM articles"):
        with pytest.raises(SQLRejected) as info:
            check(sql, TABLES, "sqlite")
        assert info.value.code == "qualified_name"


@pytest.mark.parametrize(
    "sql, says",
    [
        ("DELETE FROM articles", "only SELECT queries are allowed; got DELETE"),
        ("SELECT topic FROM articles",
         "column 'topic' is not readable; readable columns of articles: id, title, body"),
        ('SELECT id FROM articles WHERE region = "europe"', "strings take single quotes"),
        ("SELECT * FROM users", "table 'users' is not readable; readable tables: articles"),
        ("SELECT pg_sleep(1)", "function pg_sleep() is not allowed; allowed functions: abs"),
        ("WITH d AS (DELETE FROM articles RETURNING id) SELECT * FROM d",
         "DELETE is not allowed anywhere in a query"),
        ("SELECT 1; SELECT 2", "send exactly one SQL statement, got 2"),
        ("SELECT id FROM articles a, articles b", "every join needs ON"),
        ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT n FROM r",
         "recursive CTEs are not allowed"),
    ],
)
def test_reasons_say_what_to_change(sql, says):
    with pytest.raises(SQLRejected) as info:
        check(sql, TABLES, "sqlite")
    assert says in info.value.reason


def test_several_tables_and_their_columns():
    tables = {**TABLES, "authors": ["id", "name"]}
    check("SELECT a.title, w.name FROM articles AS a JOIN authors AS w ON w.id = a.id",
          tables, "sqlite")
    with pytest.raises(SQLRejected) as info:
        check("SELECT a.title FROM articles AS a JOIN secrets AS s ON s.id = a.id",
              tables, "sqlite")
    assert info.value.code == "table"


def test_allow_list_is_small_and_named():
    assert {"count", "lower", "substr", "length", "round", "row_number"} <= set(
        ALLOWED_FUNCTIONS)
    assert not {"load_extension", "pg_sleep", "set_config", "printf", "repeat"} & set(
        ALLOWED_FUNCTIONS)


def test_checked_tree_is_normalised():
    tree = check_tree("SELECT Title FROM Articles", TABLES, "sqlite")
    assert tree.sql("sqlite") == "SELECT title FROM articles"


def test_row_limit_must_be_positive():
    with pytest.raises(ValueError):
        check("SELECT 1", TABLES, "sqlite", row_limit=0)
