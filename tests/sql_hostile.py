"""Hostile SQL an agent might send to the read-only SQL tool (data only, no tests).

Each case names the `SQLRejected.code` the guard must refuse it with (per dialect where
the dialects differ) and the backends where its raw text, run under the connection layer
alone (no guard), must fail too. Where a backend is left out of `raw`, `why` says why.
The slice table is `articles`; its gold column `topic` is not allow-listed.
"""

from __future__ import annotations

from dataclasses import dataclass

BOTH = ("sqlite", "postgresql")
SQLITE = ("sqlite",)
NONE = ()

PG_CATALOG = "every PostgreSQL role may read the catalogs; only the guard refuses them"
PG_HARMLESS = ("harmless alone in PostgreSQL (rolled back; ';' is refused, so nothing can "
               "follow it)")
PG_SUPERUSER = ("with a superuser login PostgreSQL lets any role switch back; refused "
                "with a restricted login (test_restricted_login_closes_the_role_escape)")


@dataclass(frozen=True)
class Hostile:
    sql: str
    code: str  # SQLRejected.code on SQLite (and on PostgreSQL unless pg_code says otherwise)
    pg_code: str | None = None
    raw: tuple[str, ...] = BOTH  # backends whose connection layer alone must refuse it
    why: str = ""  # why `raw` leaves a backend out

    def code_for(self, backend: str) -> str:
        return self.pg_code if backend == "postgresql" and self.pg_code else self.code


H = Hostile

HOSTILE: list[Hostile] = [
    # ── writes and DDL at the root ──────────────────────────────────────────────────
    H("DELETE FROM articles", "not_select"),
    H("UPDATE articles SET title = 'x'", "not_select"),
    H("INSERT INTO articles (id, title) VALUES (999999, 'x')", "not_select"),
    H("REPLACE INTO articles (id) VALUES (1)", "not_select", pg_code="parse_error"),
    H("DROP TABLE articles", "not_select"),
    H("CREATE TABLE stolen AS SELECT * FROM articles", "not_select"),
    H("CREATE VIEW v AS SELECT topic FROM articles", "not_select"),
    H("ALTER TABLE articles ADD COLUMN x INTEGER", "not_select"),
    H("TRUNCATE TABLE articles", "not_select"),
    H("CREATE TRIGGER t AFTER INSERT ON articles BEGIN DELETE FROM articles; END",
      "multiple_statements"),
    H("GRANT SELECT ON articles TO PUBLIC", "not_select"),
    # ── writes hidden in CTEs and subqueries ────────────────────────────────────────
    H("WITH d AS (DELETE FROM articles RETURNING id) SELECT * FROM d", "forbidden"),
    H("WITH u AS (UPDATE articles SET title = 'x' RETURNING id) SELECT count(*) FROM u",
      "forbidden"),
    H("WITH i AS (INSERT INTO articles (id) VALUES (0) RETURNING id) SELECT * FROM i",
      "forbidden"),
    H("SELECT * FROM articles WHERE id IN (DELETE FROM articles RETURNING id)", "parse_error"),
    H("SELECT * INTO stolen FROM articles", "forbidden"),
    H("SELECT id FROM articles FOR UPDATE", "forbidden"),
    # ── several statements, comments hiding statements, string tricks ───────────────
    H("SELECT 1; SELECT 2", "multiple_statements"),
    H("SELECT id FROM articles; DROP TABLE articles", "multiple_statements"),
    H("SELECT id FROM articles; -- list ids\nDROP TABLE articles", "multiple_statements"),
    H("SELECT id FROM articles /* harmless */; DELETE FROM articles", "multiple_statements"),
    H("/* just a comment */ DROP TABLE articles", "not_select"),
    H("SELECT 'x'; DROP TABLE articles; --'", "multiple_statements"),
    H("SELECT id FROM articles WHERE title = ''; DELETE FROM articles; --'",
      "multiple_statements"),
    H("SELECT id FROM articles\r\n;\r\nDROP TABLE articles", "multiple_statements"),
    H("SELECT 1;\u2028DROP TABLE articles", "multiple_statements"),
    # ── ATTACH, PRAGMA, VACUUM, extensions and files ────────────────────────────────
    H("ATTACH DATABASE '/tmp/posttrain_hostile_attach.db' AS evil", "not_select",
      pg_code="parse_error"),
    H("DETACH DATABASE main", "not_select", pg_code="parse_error"),
    H("PRAGMA table_info(articles)", "not_select"),
    H("PRAGMA writable_schema = 1", "not_select"),
    H("SELECT * FROM pragma_table_info('articles')", "table_function"),
    H("SELECT name FROM pragma_database_list", "table"),
    H("VACUUM INTO '/tmp/posttrain_hostile_vacuum.db'", "not_select"),
    H("VACUUM", "not_select"),
    H("SELECT load_extension('/tmp/posttrain_hostile.so')", "function"),
    H("SELECT readfile('/etc/passwd')", "function"),
    H("SELECT writefile('/tmp/posttrain_hostile.txt', 'x')", "function"),
    H("SELECT fts3_tokenizer('simple')", "function"),
    # ── the gold column, every way round ────────────────────────────────────────────
    H("SELECT topic FROM articles", "column"),
    H('SELECT "topic" FROM articles', "column"),
    H("SELECT TOPIC FROM articles", "column"),
    H('SELECT "TOPIC" FROM articles', "column"),
    H("SELECT [topic] FROM articles", "column", pg_code="function"),  # ARRAY[...]
    H("SELECT `topic` FROM articles", "column", pg_code="parse_error"),
    H("SELECT a.topic FROM articles AS a", "column"),
    H("SELECT id FROM articles WHERE topic = 'sport'", "column"),
    H("SELECT id FROM articles ORDER BY topic", "column"),
    H("SELECT count(*) FROM articles GROUP BY topic", "column"),
    H("SELECT * FROM (SELECT topic FROM articles) AS t", "column"),
    H("WITH t(x) AS (SELECT topic FROM articles) SELECT x FROM t", "column"),
    H("SELECT id FROM articles WHERE id IN (SELECT id FROM articles WHERE topic = 'tech')",
      "column"),
    H("SELECT title FROM articles UNION SELECT topic FROM articles", "column"),
    H("SELECT to\u0440ic FROM articles", "column"),  # Cyrillic 'р'
    # ── other tables and catalogs ───────────────────────────────────────────────────
    H("SELECT * FROM sqlite_master", "table"),
    H("SELECT sql FROM sqlite_schema", "table"),
    H("SELECT * FROM sqlite_temp_master", "table"),
    H("SELECT id FROM articles UNION SELECT name FROM sqlite_master", "table"),
    H("SELECT id FROM articles NATURAL JOIN sqlite_master", "table"),
    H("SELECT * FROM articles TABLESAMPLE SYSTEM (50)", "construct"),
    H("SELECT * FROM pg_catalog.pg_tables", "qualified_name", raw=SQLITE, why=PG_CATALOG),
    H("SELECT * FROM pg_tables", "table", raw=SQLITE, why=PG_CATALOG),
    H("SELECT * FROM information_schema.columns", "qualified_name", raw=SQLITE,
      why=PG_CATALOG),
    H("SELECT * FROM pg_authid", "table"),
    H("SELECT id FROM art\u0456cles", "table"),  # Ukrainian 'і'
    H("SELECT * FROM _pt_slice", "table"),
    # ── qualified names ─────────────────────────────────────────────────────────────
    H("SELECT * FROM main.articles", "qualified_name"),
    H("SELECT * FROM temp.x", "qualified_name"),
    H("SELECT * FROM public.articles", "qualified_name"),
    H("SELECT main.articles.id FROM articles", "qualified_name"),
    H("SELECT x.id FROM articles", "qualified_name"),
    # ── CTE names ───────────────────────────────────────────────────────────────────
    H("WITH articles AS (SELECT 1 AS id) SELECT * FROM articles", "cte_name", raw=NONE,
      why="harmless without the guard: the CTE is a constant"),
    H("WITH _pt_slice AS (SELECT topic FROM articles) SELECT * FROM _pt_slice", "cte_name"),
    # ── runaway queries ─────────────────────────────────────────────────────────────
    H("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
      "recursive_cte"),
    H("WITH r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
      "recursive_cte"),
    H("WITH a AS (SELECT * FROM b), b AS (SELECT * FROM a) SELECT * FROM a", "recursive_cte"),
    H("SELECT count(*) FROM articles a, articles b, articles c, articles d, articles e",
      "cross_join"),
    H("SELECT count(*) FROM articles a CROSS JOIN articles b CROSS JOIN articles c "
      "CROSS JOIN articles d", "cross_join"),
    H("SELECT count(*) FROM articles a JOIN articles b JOIN articles c", "cross_join"),
    H("SELECT count(*) FROM articles a " + " ".join(
        f"JOIN articles t{i} ON 1 = 1" for i in range(8)), "too_many_tables"),
    H("SELECT count(*) FROM generate_series(1, 1000000000)", "table_function"),
    H("SELECT * FROM json_each('{\"a\": 1}')", "table_function", raw=SQLITE,
      why="harmless in PostgreSQL: it reads no table"),
    H("SELECT * FROM dblink('host=evil', 'SELECT 1') AS t(a INT)", "table_function"),
    H("SELECT randomblob(1000000000)", "function"),
    H("SELECT zeroblob(1000000000)", "function"),
    H("SELECT printf('%.*c', 1000000000, 'x')", "function"),
    H("SELECT repeat('x', 2000000000)", "function"),
    H("SELECT pg_sleep(10)", "function"),
    H("SELECT pg_catalog.pg_sleep(10)", "construct"),
    H('SELECT "pg_sleep"(10)', "function"),
    # ── PostgreSQL server functions and session state ───────────────────────────────
    H("SELECT pg_read_file('/etc/passwd')", "function"),
    H("SELECT pg_ls_dir('.')", "function"),
    H("SELECT lo_import('/etc/passwd')", "function"),
    H("SELECT lo_export(1, '/tmp/posttrain_hostile_lo')", "function"),
    H("SELECT dblink_exec('host=evil', 'DROP TABLE articles')", "function"),
    H("SELECT current_setting('statement_timeout')", "function", raw=SQLITE,
      why="reading a setting is allowed to every PostgreSQL role"),
    H("SELECT set_config('statement_timeout', '0', false)", "function", raw=SQLITE,
      why="the rollback undoes it, and the client-side cancel does not read it"),
    H("SELECT set_config('role', 'postgres', true), "
      "query_to_xml('SELECT topic FROM articles', true, false, '')", "function",
      raw=SQLITE, why=PG_SUPERUSER),
    H("SELECT table_to_xml('articles', true, false, '')", "function"),
    H("SELECT version()", "function", raw=SQLITE, why="harmless in PostgreSQL"),
    H("SELECT sqlite_version()", "function"),
    H("SELECT posttrain_hash(id) FROM articles", "function"),
    H("SELECT CURRENT_USER", "function", raw=SQLITE, why="harmless in PostgreSQL"),
    H("SELECT session_user", "column", pg_code="function", raw=SQLITE,
      why="harmless in PostgreSQL"),
    H("SET statement_timeout = 0", "not_select", raw=SQLITE, why=PG_HARMLESS),
    H("SET ROLE postgres", "not_select", raw=SQLITE, why=PG_SUPERUSER),
    H("RESET ROLE", "not_select", raw=SQLITE, why=PG_SUPERUSER),
    H("SET SESSION AUTHORIZATION postgres", "not_select", raw=SQLITE, why=PG_SUPERUSER),
    H("BEGIN", "not_select", raw=SQLITE, why=PG_HARMLESS),
    H("COMMIT", "not_select", raw=SQLITE, why=PG_HARMLESS),
    H("ROLLBACK", "not_select", raw=SQLITE, why=PG_HARMLESS),
    H("SAVEPOINT s", "not_select", raw=SQLITE, why=PG_HARMLESS),
    H("COPY articles TO '/tmp/posttrain_hostile.csv'", "not_select"),
    H("COPY (SELECT * FROM articles) TO STDOUT", "not_select"),
    H("LOCK TABLE articles IN ACCESS EXCLUSIVE MODE", "parse_error", pg_code="not_select"),
    H("EXPLAIN SELECT * FROM articles", "not_select"),
    H("SHOW ALL", "not_select", raw=SQLITE, why=PG_HARMLESS),
    H("ANALYZE articles", "not_select", raw=SQLITE, why=PG_HARMLESS),
    H("NOTIFY evil", "not_select", raw=SQLITE, why=PG_HARMLESS),
    H("DO $$ BEGIN DELETE FROM articles; END $$", "parse_error", pg_code="not_select"),
    H("CALL evil()", "not_select"),
    # ── bind parameters ─────────────────────────────────────────────────────────────
    H("SELECT id FROM articles WHERE id = :x", "bind_parameter"),
    H("SELECT id FROM articles WHERE id = ?", "bind_parameter"),
    H("SELECT id FROM articles WHERE id = $1", "bind_parameter"),
    # ── unicode, whitespace and size tricks ─────────────────────────────────────────
    H("SELECT topic\u00a0FROM articles", "column"),  # no-break space
    H("SELECT id FROM articles\uff1b DROP TABLE articles", "parse_error"),  # fullwidth ';'
    H("DEL\u200bETE FROM articles", "parse_error"),  # zero-width space
    H("\u0455ELECT id FROM articles", "parse_error"),  # Cyrillic 's'
    H("SELECT id FROM articles\x00; DROP TABLE articles", "parse_error"),
    H("SELECT id\tFROM\varticles\f; DROP TABLE articles", "multiple_statements"),
    H("", "empty", raw=NONE, why="nothing to run"),
    H("  ;  -- nothing", "empty", raw=NONE, why="nothing to run"),
    H("SELECT " + " + ".join(["1"] * 8000), "too_long", raw=NONE,
      why="harmless without the guard: a sum of constants"),
    H("SELECT " + "(" * 400 + "1" + ")" * 400, "parse_error", raw=NONE,
      why="harmless without the guard: a constant"),
]
