"""Warehouses the demo does not have: the demo's `articles` table grown to N rows.

`scaled_warehouse(path, rows)` builds the demo table (2,225 real BBC articles) and copies its
rows, in order, until the new table holds `rows` rows: new integer ids 1..N, and every copy
after the first gets " (k)" after its title so no two rows render the same prompt (a copy of a
held-out row would otherwise be excluded, and curation would drop it as a duplicate). Gold
labels, bodies, regions and dates are the originals'. One INSERT ... SELECT per copy, so a
million rows take seconds.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.news_topics.build_warehouse import build

COLUMNS = "title, body, published_at, region, word_count, topic"


def scaled_warehouse(path: str | Path, rows: int) -> str:
    """A SQLite warehouse at `path` whose `articles` table holds `rows` rows; its URL."""
    path = Path(path).resolve()
    demo = path.with_name(path.stem + "-demo.db")
    build(demo)
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    try:
        con.execute(f"ATTACH DATABASE '{demo}' AS demo")
        con.execute(
            "CREATE TABLE articles (id INTEGER PRIMARY KEY, title TEXT NOT NULL, body TEXT NOT "
            "NULL, published_at VARCHAR(10) NOT NULL, region VARCHAR(32) NOT NULL, "
            "word_count INTEGER NOT NULL, topic VARCHAR(32) NOT NULL)")
        n = con.execute("SELECT count(*) FROM demo.articles").fetchone()[0]
        copy = 0
        while copy * n < rows:
            take = min(n, rows - copy * n)
            suffix = "" if copy == 0 else f" || ' ({copy})'"
            con.execute(
                f"INSERT INTO articles (id, {COLUMNS}) SELECT {copy * n} + row_number() OVER "
                f"(ORDER BY id), title{suffix}, body, published_at, region, word_count, topic "
                f"FROM demo.articles ORDER BY id LIMIT {take}")
            copy += 1
        con.commit()
        con.execute("DETACH DATABASE demo")
    finally:
        con.close()
    demo.unlink(missing_ok=True)
    return f"sqlite:///{path}"
