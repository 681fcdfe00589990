"""The read-only SQL tool on real warehouses: SQLite and PostgreSQL, guard and connection.

Every hostile query in tests/sql_hostile.py is refused by the tool on both backends, and
its raw text is refused again by the hardened connection alone (no guard) wherever that
layer can tell; ordinary queries return the right rows on both; and the warehouses are
byte-for-byte (SQLite) and row-for-row (both) unchanged afterwards. The PostgreSQL half
needs $POSTTRAIN_TEST_POSTGRES_URL and skips with the reason without it."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from agents.sql_tool import ReaderRoleError, ScopedTable, SQLRejected, SQLTool, ensure_reader_role
from flows.warehouse import make_engine
from tests.sql_hostile import HOSTILE
from tests.sql_tool_helpers import (
    COLUMNS,
    LEFTOVERS,
    Backend,
    _no_leftovers,
    _pg_checksum,
    _slice_source,
    _sqlite_checksum,
)

REFUSED = (SQLRejected, sa.exc.SQLAlchemyError, ValueError)


# ── both backends: private copies of the warehouse, checksummed ─────────────────────────
@pytest.fixture(scope="module")
def lite(small_warehouse_url, tmp_path_factory):
    for p in Path("/tmp").glob(LEFTOVERS):
        p.unlink()
    path = tmp_path_factory.mktemp("hostile") / "warehouse.db"
    shutil.copy(sa.engine.make_url(small_warehouse_url).database, path)
    engine = make_engine(f"sqlite:///{path}", pool_size=1, max_overflow=0)
    source, params = _slice_source(engine)
    b = Backend("sqlite", engine, None, source, params, lambda: _sqlite_checksum(path))
    b.before = b.checksum()
    yield b
    engine.dispose()
    assert b.checksum() == b.before, "the SQLite warehouse changed"
    assert _no_leftovers() == []


@pytest.fixture(scope="module")
def pg(pg_server_url):
    from examples.news_topics.build_warehouse import build

    tag = uuid.uuid4().hex[:10]
    schema, role = f"pt_hostile_{tag}", f"pt_reader_{tag}"
    admin = sa.create_engine(pg_server_url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = f"{pg_server_url}{'&' if '?' in pg_server_url else '?'}options=-csearch_path%3D{schema}"
    build(url, per_label=40)
    engine = make_engine(url)
    ensure_reader_role(engine, role, {"articles": COLUMNS})
    source, params = _slice_source(engine)
    b = Backend("postgresql", engine, role, source, params, lambda: _pg_checksum(admin, schema, role))
    b.before = b.checksum()
    yield b
    after = b.checksum()
    engine.dispose()
    with admin.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        for r in (f"{role}_login", f"{role}_b", role):
            conn.exec_driver_sql(f'DROP ROLE IF EXISTS "{r}"')
    admin.dispose()
    assert after == b.before, "the PostgreSQL warehouse changed"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request) -> Backend:
    return request.getfixturevalue("lite" if request.param == "sqlite" else "pg")


# ── ordinary queries return the right rows on both ──────────────────────────────────────
def _legit_cases(rows: list[dict]) -> dict[str, tuple[str, list[dict]]]:
    ids = [r["id"] for r in rows]
    mid = ids[len(ids) // 2]
    years = Counter(r["published_at"][:4] for r in rows)
    most = max(r["word_count"] for r in rows)
    kinds = Counter("long" if r["word_count"] > 300 else "short" for r in rows)
    return {
        "count": ("SELECT count(*) AS n FROM articles", [{"n": len(rows)}]),
        "paging": ("SELECT id FROM articles ORDER BY id LIMIT 5 OFFSET 3",
                   [{"id": i} for i in ids[3:8]]),
        "keyset": (f"SELECT id FROM articles WHERE id > {mid} ORDER BY id LIMIT 4",
                   [{"id": i} for i in ids if i > mid][:4]),
        "group_by": (("SELECT substr(published_at, 1, 4) AS y, count(*) AS n FROM articles "
                     "GROUP BY substr(published_at, 1, 4) ORDER BY y"),
                     [{"y": y, "n": n} for y, n in sorted(years.items())]),
        "aggregates": ("SELECT min(id) AS lo, max(id) AS hi, sum(word_count) AS s FROM articles",
                       [{"lo": min(ids), "hi": max(ids),
                         "s": sum(r["word_count"] for r in rows)}]),
        "cte": (("WITH long AS (SELECT id FROM articles WHERE word_count > 300) "
                "SELECT count(*) AS n FROM long"), [{"n": kinds["long"]}]),
        "subquery": (("SELECT id FROM articles WHERE word_count = "
                     "(SELECT max(word_count) FROM articles) ORDER BY id"),
                     [{"id": r["id"]} for r in rows if r["word_count"] == most]),
        "case": (("SELECT CASE WHEN word_count > 300 THEN 'long' ELSE 'short' END AS k, "
                 "count(*) AS n FROM articles GROUP BY 1 ORDER BY 1"),
                 [{"k": k, "n": n} for k, n in sorted(kinds.items())]),
        "strings": (("SELECT id, lower(substr(title, 1, 8)) AS t, length(title) AS l "
                    "FROM articles ORDER BY id LIMIT 3"),
                    [{"id": r["id"], "t": r["title"][:8].lower(), "l": len(r["title"])}
                     for r in rows[:3]]),
        "union": ((f"SELECT id FROM articles WHERE id <= {ids[1]} UNION "
                  f"SELECT id FROM articles WHERE id >= {ids[-2]} ORDER BY 1"),
                  [{"id": i} for i in [*ids[:2], *ids[-2:]]]),
        "except": ((f"SELECT id FROM articles EXCEPT SELECT id FROM articles WHERE id > {ids[2]} "
                   "ORDER BY 1"), [{"id": i} for i in ids[:3]]),
        "star_in_subquery": ("SELECT * FROM (SELECT * FROM articles) AS t ORDER BY id LIMIT 2",
                             rows[:2]),
        "self_join": ("SELECT count(*) AS n FROM articles AS a JOIN articles AS b ON a.id = b.id",
                      [{"n": len(rows)}]),
        "exists_in": (("SELECT count(*) AS n FROM articles WHERE id IN "
                      "(SELECT id FROM articles WHERE word_count > 300) "
                      "AND EXISTS (SELECT 1 FROM articles)"), [{"n": kinds["long"]}]),
        "literals": ("SELECT '10:30' AS t, '50%' AS p FROM articles LIMIT 1",
                     [{"t": "10:30", "p": "50%"}]),
        "like": ("SELECT count(*) AS n FROM articles WHERE lower(title) LIKE '%e%'",
                 [{"n": sum("e" in r["title"].lower() for r in rows)}]),
        "quoted": ('SELECT "title" FROM articles ORDER BY id LIMIT 1',
                   [{"title": rows[0]["title"]}]),
    }


def test_ordinary_queries_return_the_right_rows(backend):
    rows = backend.slice_rows()
    assert 10 < len(rows) and {r["region"] for r in rows} == {"europe"}
    tool = backend.tool()
    wrong = {}
    for name, (sql, expected) in _legit_cases(rows).items():
        got = tool.run(sql)["rows"]
        if got != expected:
            wrong[name] = (sql, got[:3], expected[:3])
    assert not wrong
    avg = tool.run("SELECT round(avg(word_count), 2) AS a FROM articles")["rows"][0]["a"]
    assert avg == pytest.approx(sum(r["word_count"] for r in rows) / len(rows), abs=0.01)
    assert tool.lookup_row(rows[0]["id"]) == rows[0]
    assert tool.stats["executed"] == len(_legit_cases(rows)) + 1 and not tool.stats["rejected"]


def test_a_fresh_connection_reads_its_slice_first_time(small_warehouse_url):
    """The slice's ids come through json_each, a virtual table SQLite connects on first use;
    that must work when the tool's query is the connection's very first."""
    engine = make_engine(small_warehouse_url, poolclass=sa.pool.NullPool)  # a new one per query
    source, params = _slice_source(engine)
    tool = SQLTool(engine, ScopedTable("articles", COLUMNS, source, params, "id"))
    n = len(json.loads(params["pt_members"]))
    assert n > 10 and tool.run("SELECT count(*) AS n FROM articles")["rows"] == [{"n": n}]
    assert tool.run("SELECT DISTINCT region FROM articles")["rows"] == [{"region": "europe"}]


# ── the hostile corpus: refused by the tool, and by the connection alone ────────────────
def test_the_tool_refuses_every_hostile_query(backend):
    tool = backend.tool()
    wrong = {}
    for case in HOSTILE:
        try:
            tool.run(case.sql)
            wrong[case.sql] = "ran"
        except SQLRejected as e:
            if e.code != case.code_for(backend.name):
                wrong[case.sql] = e.code
    assert not wrong
    assert tool.stats["rejected"] == len(HOSTILE) and tool.stats["executed"] == 0
    assert sum(tool.stats["by_code"].values()) == len(HOSTILE)


def test_the_connection_alone_refuses_hostile_sql(backend):
    """No guard: each raw text goes straight to the hardened connection and must fail."""
    tool = backend.tool(timeout_s=0.5)
    cases = [c for c in HOSTILE if backend.name in c.raw]
    assert len(cases) >= 40
    ran = []
    for case in cases:
        try:
            tool._execute(case.sql)
            ran.append(case.sql)
        except REFUSED:
            pass
    assert ran == []
    assert _no_leftovers() == []


def test_sqlite_layer_refuses_by_authorizer(lite):
    tool = lite.tool()
    refusals = {
        "SELECT topic FROM articles": "access to articles.topic is prohibited",
        "SELECT title FROM articles": "access to articles.title is prohibited",  # not via slice
        "WITH _pt_slice AS (SELECT title FROM articles) SELECT * FROM _pt_slice": "prohibited",
        "SELECT posttrain_hash(1)": "not authorized to use function: posttrain_hash",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT n FROM r":
            "not authorized",
        "ATTACH DATABASE '/tmp/posttrain_hostile_attach.db' AS evil": "not authorized",
        "VACUUM INTO '/tmp/posttrain_hostile_vacuum.db'": "authoriz",
        "PRAGMA query_only = 0": "not authorized",
        "SELECT * FROM pragma_table_info('articles')": "not authorized",
    }
    for sql, says in refusals.items():
        with pytest.raises(sa.exc.DatabaseError, match=says):
            tool._execute(sql)
    assert _no_leftovers() == []


def test_sqlite_deadline_and_restored_connection(lite):
    tool = lite.tool(timeout_s=0.3, source="SELECT * FROM articles", params={})
    bomb = "SELECT count(*) AS n FROM articles a " + " ".join(
        f"JOIN articles t{i} ON t{i}.id > 0" for i in range(4))
    start = time.monotonic()
    with pytest.raises(SQLRejected) as info:
        tool.run(bomb)  # passes the guard (every join has a column condition): the deadline
    assert info.value.code == "timeout" and time.monotonic() - start < 2
    assert tool.stats["by_code"] == {"timeout": 1}
    with pytest.raises(sa.exc.DatabaseError):
        tool._execute("SELECT topic FROM articles")
    # the pooled connection (pool_size=1) comes back plain: trusted code reads as before
    with lite.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT topic FROM articles LIMIT 1").scalar()
        raw = conn.connection.driver_connection
        assert raw.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, -1) == 10


def test_postgres_layer_refuses_by_role_and_transaction(pg):
    tool = pg.tool(timeout_s=0.5)
    with pytest.raises(sa.exc.ProgrammingError, match="permission denied for table articles"):
        tool._execute("SELECT topic FROM articles")
    with pytest.raises(sa.exc.DBAPIError, match="read-only transaction"):
        tool._execute("CREATE TEMP TABLE stolen (a INTEGER)")
    with pytest.raises(SQLRejected) as info:
        tool._execute("SELECT 1; SELECT 2")
    assert info.value.code == "multiple_statements"
    for sleeper in ("SELECT pg_sleep(5)",
                    "SELECT set_config('statement_timeout', '0', true), pg_sleep(5)"):
        start = time.monotonic()
        with pytest.raises(SQLRejected) as info:
            tool._execute(sleeper)
        assert info.value.code == "timeout" and time.monotonic() - start < 3
    # the role scopes columns, not rows: rows are the slice CTE's job, behind the guard
    assert len(tool._execute("SELECT id FROM articles")) == 200


def test_restricted_login_closes_the_role_escape(pg):
    escape = ("SELECT set_config('role', 'postgres', true), "
              "query_to_xml('SELECT topic FROM articles', true, false, '') AS x")
    # with a superuser login only the guard stands in the way (see agents/sql_tool.py)
    assert "<topic>" in pg.tool()._execute(escape)[0]["x"]
    with pytest.raises(SQLRejected) as info:
        pg.tool().run(escape)
    assert info.value.code == "function"
    # with a login that can only become the reader role, PostgreSQL refuses it too
    login = f"{pg.role}_login"
    with pg.engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{login}" LOGIN NOINHERIT')
        conn.exec_driver_sql(f'GRANT "{pg.role}" TO "{login}"')
    engine = make_engine(pg.engine.url.set(username=login))
    try:
        tool = SQLTool(engine, pg.tool().scoped, timeout_s=1.0, pg_role=pg.role)
        assert tool.run("SELECT count(*) AS n FROM articles")["rows"][0]["n"] > 10
        for sql in (escape, "SET ROLE postgres", "SET SESSION AUTHORIZATION postgres"):
            with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
                tool._execute(sql)
    finally:
        engine.dispose()


def test_ensure_reader_role_is_idempotent_and_repairs(pg):
    role = f"{pg.role}_b"
    tables = {"articles": COLUMNS}
    statements = []

    def record(_conn, _cursor, statement, *_args):
        statements.append(statement)

    def readable(column: str) -> bool:
        with pg.engine.connect() as conn:
            return conn.execute(sa.text(
                "SELECT has_column_privilege(:r, 'articles', :c, 'SELECT')"),
                {"r": role, "c": column}).scalar()

    sa.event.listen(pg.engine, "before_cursor_execute", record)
    try:
        ensure_reader_role(pg.engine, role, tables)
        assert any(s.startswith("CREATE ROLE") for s in statements)
        assert readable("title") and not readable("topic")
        statements.clear()
        ensure_reader_role(pg.engine, role, tables, force=True)  # already right: no changes
        assert not [s for s in statements if s.split()[0] in ("CREATE", "GRANT", "REVOKE")]
        with pg.engine.begin() as conn:
            conn.exec_driver_sql(f'GRANT SELECT ON articles TO "{role}"')  # too much
        assert readable("topic")
        ensure_reader_role(pg.engine, role, tables, force=True)
        assert readable("title") and not readable("topic")
    finally:
        sa.event.remove(pg.engine, "before_cursor_execute", record)


def test_ensure_reader_role_explains_what_an_admin_must_run(pg):
    login = f"{pg.role}_login"
    with pg.engine.begin() as conn:
        conn.exec_driver_sql(
            f'DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = \'{login}\') '
            f'THEN CREATE ROLE "{login}" LOGIN; END IF; END $$')
    engine = make_engine(pg.engine.url.set(username=login))
    try:
        with pytest.raises(ReaderRoleError) as info:
            ensure_reader_role(engine, f"{pg.role}_missing", {"articles": COLUMNS})
        message = str(info.value)
        assert "does not exist" in message and "Ask an administrator to run" in message
        assert f'CREATE ROLE "{pg.role}_missing" NOLOGIN NOINHERIT' in message
        assert 'GRANT SELECT ("id", "title"' in message
    finally:
        engine.dispose()


def test_zz_the_warehouses_are_unchanged(backend):
    """Last in the module: after the whole corpus, with and without the guard."""
    assert backend.checksum() == backend.before
    assert _no_leftovers() == []
