"""The PostgreSQL reader role the SQL tool runs agents' queries as.

A SELECT-only role (NOLOGIN, NOINHERIT, a member of nothing) with column-level grants on
exactly the allow-listed columns, so PostgreSQL itself refuses the gold column.
`ensure_reader_role` checks it and creates or fixes it when this login may; otherwise it
raises `ReaderRoleError` with the exact SQL for an administrator (`reader_role_sql`).

Production note: connect the agents as a login that can only become this role. A superuser
login can switch out of it (PostgreSQL checks a role switch against the login); the SQL
guard refuses every such statement, and a warning is logged once for superuser logins.
"""

from __future__ import annotations

import logging
import threading

import sqlalchemy as sa

log = logging.getLogger(__name__)

DEFAULT_READER_ROLE = "posttrain_reader"


class ReaderRoleError(RuntimeError):
    """The PostgreSQL reader role is missing or wrong and this login cannot fix it."""


# ── the PostgreSQL reader role ───────────────────────────────────────────────────────────
_ROLE_READY: set[tuple] = set()
_ROLE_LOCK = threading.Lock()


def reader_role_sql(role: str, tables: dict[str, list[str]], schemas: dict[str, str]) -> list[str]:
    """The statements that make `role` a SELECT-only role over exactly these columns.

    `schemas` maps each table to its schema. Run by a role with CREATEROLE (and the
    tables' owner or a superuser for the GRANTs); the connecting login must be a member
    (`GRANT role TO login`) to `SET ROLE` to it. Temporary tables need no REVOKE: the
    tool's transactions are READ ONLY, which refuses CREATE TEMP TABLE."""
    q = _quote_pg
    out = [f"CREATE ROLE {q(role)} NOLOGIN NOINHERIT"]
    for table, cols in tables.items():
        schema = schemas.get(table, "public")
        out += [
            f"GRANT USAGE ON SCHEMA {q(schema)} TO {q(role)}",
            f"REVOKE ALL ON TABLE {q(schema)}.{q(table)} FROM {q(role)}",
            f"GRANT SELECT ({', '.join(map(q, cols))}) ON TABLE {q(schema)}.{q(table)} TO {q(role)}",
        ]
    return [*out, f"GRANT {q(role)} TO CURRENT_USER"]


def _quote_pg(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def ensure_reader_role(
    engine: sa.Engine,
    role: str = DEFAULT_READER_ROLE,
    tables: dict[str, list[str]] | None = None,
    *,
    force: bool = False,
) -> None:
    """Make `role` a SELECT-only role over exactly `tables`' listed columns, idempotently.

    Checks first and changes nothing when the role is already right (the answer is cached
    per engine URL, role and tables unless `force`); otherwise creates and grants
    (CREATE ROLE ... NOLOGIN NOINHERIT, GRANT USAGE on the schemas, REVOKE ALL and GRANT
    SELECT (columns) on each table, GRANT role TO the login). Raises ReaderRoleError,
    with the SQL for an administrator, when this login may not."""
    tables = tables or {}
    key = (engine.url.render_as_string(hide_password=True), role,
           tuple(sorted((t, tuple(sorted(c))) for t, c in tables.items())))
    if key in _ROLE_READY and not force:
        return
    with _ROLE_LOCK:
        problems, fixes, schemas = _role_state(engine, role, tables)
        detail = None
        for _attempt in range(3):  # another process may be granting the same thing
            if not problems or fixes is None:
                break
            try:
                with engine.begin() as conn:
                    for stmt in fixes:
                        conn.exec_driver_sql(stmt)
            except sa.exc.DBAPIError as e:
                detail = str(getattr(e, "orig", e)).strip().splitlines()[0]
            problems, fixes, schemas = _role_state(engine, role, tables)
        if problems:
            raise ReaderRoleError(_role_help(role, problems, detail, tables, schemas))
        _ROLE_READY.add(key)


def _role_help(role, problems, detail, tables, schemas) -> str:
    why = f" ({detail})" if detail else ""
    sql = "\n".join(f"  {s};" for s in reader_role_sql(role, tables, schemas))
    return (
        f"the PostgreSQL reader role {role!r} is not ready: {'; '.join(problems)}; this "
        f"login cannot fix it{why}. Ask an administrator to run:\n{sql}"
    )


def _role_state(engine: sa.Engine, role: str, tables: dict[str, list[str]]):
    """(problems, statements that fix them or None if they can't be fixed, schemas)."""
    with engine.connect() as conn:
        try:
            return _role_state_on(conn, role, tables)
        finally:
            conn.rollback()


def _role_state_on(conn, role: str, tables: dict[str, list[str]]):
    def one(sql: str, **params):
        return conn.execute(sa.text(sql), params).first()

    problems: list[str] = []
    fixes: list[str] = []
    q, r = _quote_pg, _quote_pg(role)
    me = one("SELECT session_user, rolsuper FROM pg_roles WHERE rolname = session_user")
    if me is not None and me[1]:
        _warn_superuser_once(me[0])
    attrs = one("SELECT oid, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = :r", r=role)
    if attrs is None:
        problems.append("the role does not exist")
        fixes.append(f"CREATE ROLE {r} NOLOGIN NOINHERIT")
    else:
        if attrs[1] or attrs[2]:
            problems.append("the role is a superuser or bypasses row security")
            fixes.append(f"ALTER ROLE {r} NOSUPERUSER NOBYPASSRLS")
        for (parent,) in conn.execute(sa.text(
            "SELECT b.rolname FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.roleid "
            "WHERE m.member = :oid"), {"oid": attrs[0]}):
            problems.append(f"the role is a member of {parent!r}")
            fixes.append(f"REVOKE {q(parent)} FROM {r}")
        if me is not None and me[0] != role and not me[1] and not one(
            "SELECT pg_has_role(session_user, :r, 'MEMBER')", r=role)[0]:
            problems.append(f"login {me[0]!r} is not a member of the role")
            fixes.append(f"GRANT {r} TO {q(me[0])}")
    schemas: dict[str, str] = {}
    unfixable = False
    search_path = [
        me[0] if p == "$user" and me is not None else p
        for p in (x.strip().strip('"') for x in one("SHOW search_path")[0].split(","))
    ]
    for table, cols in tables.items():
        found = _find_table(conn, table, search_path)
        if found is None:
            problems.append(f"table {table!r} is not found on the search_path")
            unfixable = True
            continue
        oid, schema, name = found
        schemas[table] = schema
        target = f"{q(schema)}.{q(name)}"
        existing = [row[0] for row in conn.execute(sa.text(
            "SELECT attname FROM pg_attribute WHERE attrelid = :oid AND attnum > 0 "
            "AND NOT attisdropped"), {"oid": oid})]
        missing = [c for c in cols if c not in existing]
        if missing:
            problems.append(f"{table!r} has no column(s) {', '.join(missing)}")
            unfixable = True
            continue
        if attrs is None:
            fixes += [f"GRANT USAGE ON SCHEMA {q(schema)} TO {r}",
                      f"GRANT SELECT ({', '.join(q(c) for c in cols)}) ON TABLE {target} TO {r}"]
            continue
        wrong = _wrong_privileges(conn, role, oid, schema, existing, cols)
        if wrong:
            problems += wrong
            fixes += [f"GRANT USAGE ON SCHEMA {q(schema)} TO {r}",
                      f"REVOKE ALL ON TABLE {target} FROM {r}",
                      f"GRANT SELECT ({', '.join(q(c) for c in cols)}) ON TABLE {target} TO {r}"]
    if attrs is None and me is not None and not me[1]:
        fixes.append(f"GRANT {r} TO {q(me[0])}")
    if any("PUBLIC" in p for p in problems):
        unfixable = True
    return problems, (None if unfixable else fixes), schemas


def _find_table(conn, table: str, search_path: list[str]):
    """(oid, schema, name) of `table` along the search_path, read from the catalogs
    (to_regclass and current_schemas skip schemas this login has no USAGE on)."""
    rows = conn.execute(sa.text(
        "SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE c.relname = :t AND n.nspname IN :path "
        "AND c.relkind IN ('r', 'v', 'm', 'p', 'f')").bindparams(
            sa.bindparam("path", expanding=True)), {"t": table, "path": search_path}).all()
    rows.sort(key=lambda r: search_path.index(r[1]))
    return rows[0] if rows else None


def _wrong_privileges(conn, role, oid, schema, existing, allowed) -> list[str]:
    out = []
    usage = conn.execute(sa.text("SELECT has_schema_privilege(:r, :s, 'USAGE')"),
                         {"r": role, "s": schema}).scalar()
    if not usage:
        out.append(f"no USAGE on schema {schema!r}")
    writes = conn.execute(sa.text(
        "SELECT has_table_privilege(:r, :oid, 'INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, "
        "TRIGGER')"), {"r": role, "oid": oid}).scalar()
    if writes:
        out.append("the role may write to the table")
    for col in existing:
        may, public = conn.execute(sa.text(
            "SELECT has_column_privilege(:r, :oid, :c, 'SELECT'), "
            "has_column_privilege('public', :oid, :c, 'SELECT')"),
            {"r": role, "oid": oid, "c": col}).first()
        if public and col not in allowed:
            out.append(f"PUBLIC may read column {col!r} (REVOKE SELECT ... FROM PUBLIC)")
        elif may != (col in allowed):
            out.append(f"column {col!r} is {'readable' if may else 'not readable'}")
    return out


_WARNED: set[str] = set()


def _warn_superuser_once(login: str) -> None:
    if login not in _WARNED:
        _WARNED.add(login)
        log.warning(
            "the SQL tool connects as superuser %r: the reader role then holds only behind "
            "the SQL guard (a login may always SET ROLE back to itself); give agents a "
            "login that can only become the reader role", login,
        )
