"""Bench: the contamination guard finds paraphrased and edited copies of held-out rows in the
training data, and leaves the rest alone (issue 15, "Contamination guard").

A copy of the demo warehouse (2,225 real BBC articles) gets N new rows: lightly edited copies
of held-out rows, under new ids that the spec's holdout rule does NOT hold out (so they would
be sliced, labelled and trained on). Each copy gets one to three edits drawn from: synonym
swaps (a small built-in table), word drops and insertions, sentence reordering, typos, case
and punctuation changes, a truncated lead (first sentence dropped), an extended lead (a new
first sentence), a title rewrite. The guard then runs exactly as curation applies it
(`flows.contamination.guard_examples`, the held-out index built from the warehouse by
`iter_eval_rows` + `render_prompt`) over the rendered prompt of every row that is not held
out: the clean rows and the injected ones.

Figures (the last line printed, one JSON object):
    injected, injected_removed, injected_removed_share   wanted: share >= 0.95
    injected_by_edit        edit -> [removed, injected] (a row with several edits counts once
                            for each)
    clean, clean_removed, clean_true_duplicates(_removed), clean_false_positives,
    clean_removed_share     a clean row with a held-out row's title (casefolded), or whose body
                            is a near-copy of a held-out row's body (word 3-gram Jaccard >= 0.5,
                            measured apart from the guard), is a genuine duplicate in the BBC
                            corpus, i.e. contamination the guard should catch; the other clean
                            rows removed are false positives, and clean_removed_share = false
                            positives / clean. Wanted: < 0.01
    threshold, ngram, num_perm, held_out_rows, index_seconds, check_seconds, rows_per_s
                            (checked rows a second, index built once), sample (the guard's)
    sweep                   the same measurement at other thresholds
    index_bytes_per_row     Python memory of the held-out index per row (tracemalloc)

    .venv/bin/python bench/contamination.py --quick     # 60 injected rows, 2 sweep points
    .venv/bin/python bench/contamination.py             # 600 injected rows, 6 sweep points

Scale mode (`--scale N`): the cost of the held-out index at warehouse sizes the demo does not
reach. N held-out prompts are made from the demo table's rows: row k keeps article k mod 2,225's
title, with " (k div 2,225)" after it as bench/warehouses.py grows a table, and its body is 70
words walked at random (seeded by k) along the demo bodies' word chain (each next word one that
follows the last somewhere in the corpus). So two rows share the corpus's common word pairs, as
unrelated articles do, but not whole leads: copies of the 2,225 articles under new titles would
make every prompt a near-copy of dozens of others, and bodies of whole sentences drawn from the
demo's ~40k share sentences once N is large (at 3,000 rows already 37 of 800 new rows matched).
They are streamed into a `HeldOutIndex` (the demo spec's threshold, ngram, num_perm),
then `--checks` training prompts (default 5,000) are looked up: a fifth are edited copies of
indexed prompts (the edits above), the rest new rows made the same way (k >= N), not indexed.
Each index is built in a fresh process (`--scale-point`), so its peak RSS is its own:
    made_up_rows_s (making up and rendering the held-out rows, streamed into the build),
    build_s, build_ms_per_row (the index's own work: the build's time less made_up_rows_s),
    index_bytes_per_row (after only: the bytes the index's arrays hold, `HeldOutIndex.nbytes`),
    rss_bytes_per_row (RSS after the build minus before, per row: with the build's freed
    buffers that the C allocator keeps for the process's next allocations),
    peak_rss_bytes_per_row (peak RSS minus RSS before the build, per row), check_s,
    check_rows_per_s, copies_removed (of copies), fresh_removed (of fresh)
`--compare` builds `agents.text_diversity.NearDuplicates` too (the structure the index used
before, still used for answers) on the same prompts: its figures under "before", and
`verdicts_differing`, the checks whose verdict (matched prompt, similarity) differ (wanted 0).

    .venv/bin/python bench/contamination.py --scale 20000 --compare
    .venv/bin/python bench/contamination.py --scale 100000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workdir import workdir

ROOT = Path(__file__).resolve().parent.parent
DEMO_SPEC = ROOT / "examples" / "news_topics" / "spec.yaml"

SYNONYMS = {
    "said": "stated", "says": "states", "company": "firm", "firm": "company",
    "government": "administration", "people": "individuals", "year": "twelvemonth",
    "years": "twelvemonths", "new": "fresh", "big": "large", "large": "big",
    "show": "reveal", "shows": "reveals", "rise": "increase", "rose": "increased",
    "fall": "decline", "fell": "declined", "market": "marketplace", "profits": "earnings",
    "sales": "turnover", "plans": "proposals", "told": "informed", "film": "movie",
    "game": "match", "win": "victory", "won": "secured", "added": "continued",
    "expected": "anticipated", "week": "seven days", "month": "four weeks", "also": "too",
    "first": "initial", "last": "previous", "number": "count", "help": "assist",
    "major": "significant", "chief": "head", "move": "step", "deal": "agreement",
    "top": "leading", "bid": "offer", "users": "customers", "minister": "secretary",
    "music": "songs", "world": "globe", "country": "nation", "uk": "britain",
}
FILLERS = ["reportedly", "also", "now", "indeed", "however", "still", "in fact", "meanwhile"]
LEADS = ["In a story that has drawn wide attention this week,",
         "According to reports published on Monday,",
         "Here is the latest on a developing story.",
         "Sources close to the matter have confirmed the following news."]
TITLE_PREFIXES = ["Report:", "Update -", "Analysis:", "Breaking:"]

_WORD = re.compile(r"\b\w+\b")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def synonym_swap(title: str, body: str, rng: random.Random) -> tuple[str, str]:
    """Up to a third of the words that have a synonym in the table, swapped."""
    def swap(m: re.Match) -> str:
        word = m.group(0)
        alt = SYNONYMS.get(word.lower())
        if alt is None or rng.random() > 0.35:
            return word
        return alt.capitalize() if word[0].isupper() else alt
    return _WORD.sub(swap, title), _WORD.sub(swap, body)


def drop_insert(title: str, body: str, rng: random.Random) -> tuple[str, str]:
    """About 5% of the words dropped and as many filler words inserted."""
    out = []
    for w in body.split(" "):
        r = rng.random()
        if r < 0.05:
            continue
        out.append(w)
        if r > 0.95:
            out.append(rng.choice(FILLERS))
    return title, " ".join(out)


def reorder(title: str, body: str, rng: random.Random) -> tuple[str, str]:
    """The first two sentences swapped (the lead the prompt shows changes order)."""
    s = _SENTENCE.split(body)
    if len(s) >= 2:
        s[0], s[1] = s[1], s[0]
    return title, " ".join(s)


def typos(title: str, body: str, rng: random.Random) -> tuple[str, str]:
    """About 8% of the longer words get two adjacent letters swapped."""
    def typo(m: re.Match) -> str:
        w = m.group(0)
        if len(w) < 4 or rng.random() > 0.08:
            return w
        i = rng.randrange(1, len(w) - 2)
        return w[:i] + w[i + 1] + w[i] + w[i + 2:]
    return _WORD.sub(typo, title), _WORD.sub(typo, body)


def case_punct(title: str, body: str, rng: random.Random) -> tuple[str, str]:
    """Case changed (lower or upper) and punctuation dropped or changed."""
    how = rng.choice(["lower", "upper", "nopunct", "exclaim"])
    if how == "lower":
        return title.lower(), body.lower()
    if how == "upper":
        return title.upper(), body.upper()
    if how == "nopunct":
        return re.sub(r"[^\w\s]", "", title), re.sub(r"[^\w\s]", "", body)
    return title + "!", body.replace(".", "!").replace(",", ";")


def truncate_lead(title: str, body: str, rng: random.Random) -> tuple[str, str]:
    """The first sentence dropped (the 300-character lead then shows later text); a first
    "sentence" longer than 200 characters (punctuation gone) loses its first ~80 instead."""
    s = _SENTENCE.split(body)
    if len(s) > 2 and len(s[0]) <= 200:
        return title, " ".join(s[1:])
    cut = body.find(" ", 80)
    return title, body[cut + 1:] if cut > 0 else body


def extend_lead(title: str, body: str, rng: random.Random) -> tuple[str, str]:
    """A new first sentence (the lead then shows less of the original)."""
    return title, rng.choice(LEADS) + " " + body


def rewrite_title(title: str, body: str, rng: random.Random) -> tuple[str, str]:
    """A prefix, a synonym swap and a word dropped from the title."""
    words = title.split()
    if len(words) > 3:
        del words[rng.randrange(len(words))]
    t, _ = synonym_swap(" ".join(words), "", rng)
    return f"{rng.choice(TITLE_PREFIXES)} {t}", body


EDITS = {f.__name__: f for f in (synonym_swap, drop_insert, reorder, typos, case_punct,
                                 truncate_lead, extend_lead, rewrite_title)}


def edited_copy(title: str, body: str, rng: random.Random) -> tuple[str, str, list[str]]:
    """One to three edits, in a random order: (title, body, the edits' names)."""
    names = rng.sample(sorted(EDITS), rng.randint(1, 3))
    for name in names:
        title, body = EDITS[name](title, body, rng)
    return title, body, names


def demo_copy(folder: Path) -> tuple[Path, str]:
    """The demo warehouse built afresh in `folder`, and a copy of the demo spec pointing at it."""
    from examples.news_topics.build_warehouse import build

    db = folder / "warehouse.db"
    build(db)
    data = yaml.safe_load(DEMO_SPEC.read_text())
    data["warehouse"]["url"] = f"sqlite:///{db}"
    spec_path = folder / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return db, str(spec_path)


def inject(db: Path, spec, n: int, seed: int) -> tuple[dict[int, list[str]], int]:
    """`n` edited copies of held-out rows under new ids that are not held out:
    ({new id: edits}, held-out rows)."""
    from flows.warehouse import HASH_MODULUS, stable_hash

    cut = round(spec.evaluation.holdout_fraction * HASH_MODULUS)
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT id, title, body, published_at, region, topic FROM articles "
                           "ORDER BY id").fetchall()
        held = [r for r in rows if stable_hash(r[0]) % HASH_MODULUS < cut]
        rng = random.Random(seed)
        next_id, injected = max(r[0] for r in rows) + 1, {}
        for _ in range(n):
            while stable_hash(next_id) % HASH_MODULUS < cut:  # a held-out id: not sliced
                next_id += 1
            src = rng.choice(held)
            title, body, edits = edited_copy(src[1], src[2], rng)
            con.execute("INSERT INTO articles (id, title, body, published_at, region, "
                        "word_count, topic) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (next_id, title, body, src[3], src[4], len(body.split()), src[5]))
            injected[next_id] = edits
            next_id += 1
        con.commit()
    finally:
        con.close()
    return injected, len(held)


def genuine_duplicates(db: Path, spec, injected: dict) -> set[int]:
    """Clean (original: not injected, not held out) rows that are copies of a held-out row in the
    corpus itself: the same title (casefolded), or a body whose word 3-gram Jaccard similarity to a
    held-out body is >= 0.5 (measured over whole bodies, apart from the guard's prompts)."""
    from agents.text_diversity import NearDuplicates
    from flows.warehouse import HASH_MODULUS, stable_hash

    cut = round(spec.evaluation.holdout_fraction * HASH_MODULUS)
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT id, title, body FROM articles ORDER BY id").fetchall()
    finally:
        con.close()
    bodies, titles = NearDuplicates(threshold=0.5, ngram=3), set()
    for i, title, body in rows:
        if stable_hash(i) % HASH_MODULUS < cut:
            bodies.add(str(i), body)
            titles.add(title.casefold().strip())
    return {i for i, title, body in rows
            if stable_hash(i) % HASH_MODULUS >= cut and i not in injected
            and (title.casefold().strip() in titles or bodies.find(body) is not None)}


def training_prompts(db: Path, spec) -> list[dict]:
    """{id, prompt} of every row that is not held out, rendered with the spec's template."""
    import sqlalchemy as sa

    from flows.warehouse import HASH_MODULUS, make_engine, render_prompt, stable_hash

    cut = round(spec.evaluation.holdout_fraction * HASH_MODULUS)
    engine = make_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM articles"))]
    engine.dispose()
    return [{"id": r["id"], "prompt": render_prompt(spec, r)} for r in rows
            if stable_hash(r["id"]) % HASH_MODULUS >= cut]


def measure(spec, spec_path: str, items: list[dict], injected: dict[int, list[str]],
            duplicates: set[int], threshold: float) -> dict:
    """The guard as curation applies it at one threshold, and what it removed."""
    from flows.contamination import guard_examples, held_out_index

    spec = spec.model_copy(update={"contamination": spec.contamination.model_copy(
        update={"threshold": threshold})})
    c = spec.contamination
    t0 = time.perf_counter()
    held_out_index(spec_path, c.threshold, c.ngram, c.num_perm)
    index_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    kept, figures = guard_examples(spec, spec_path, items)
    check_s = time.perf_counter() - t0
    kept_ids = {k["id"] for k in kept}
    removed = {i["id"] for i in items} - kept_ids
    clean = [i["id"] for i in items if i["id"] not in injected]
    clean_removed = [i for i in clean if i in removed]
    false_pos = [i for i in clean_removed if i not in duplicates]
    by_edit: dict[str, list[int]] = {}
    for i, edits in injected.items():
        for e in edits:
            by_edit.setdefault(e, [0, 0])
            by_edit[e][0] += i in removed
            by_edit[e][1] += 1
    inj_removed = sum(i in removed for i in injected)
    return {"threshold": threshold, "injected": len(injected), "injected_removed": inj_removed,
            "injected_removed_share": round(inj_removed / max(len(injected), 1), 4),
            "injected_by_edit": dict(sorted(by_edit.items())),
            "clean": len(clean), "clean_removed": len(clean_removed),
            "clean_true_duplicates": len(duplicates),
            "clean_true_duplicates_removed": len(clean_removed) - len(false_pos),
            "clean_false_positives": len(false_pos),
            "clean_removed_share": round(len(false_pos) / max(len(clean), 1), 5),
            "checked": figures["checked"], "held_out_rows": figures["held_out_rows"],
            "ngram": c.ngram, "num_perm": c.num_perm,
            "index_seconds": round(index_s, 3), "check_seconds": round(check_s, 3),
            "rows_per_s": round(figures["checked"] / check_s, 1), "sample": figures["sample"]}


def index_bytes_per_row(spec, spec_path: str) -> float:
    """Python memory the held-out index holds per held-out row (tracemalloc)."""
    import tracemalloc

    from flows.contamination import HeldOutIndex
    from flows.warehouse import make_engine

    c = spec.contamination
    engine = make_engine(spec.warehouse.url)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = HeldOutIndex.from_warehouse(spec, engine, c.threshold, c.ngram, c.num_perm)
    size = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    engine.dispose()
    return round(size / max(len(index), 1))

# ── scale mode ──────────────────────────────────────────────────────────────────────────────
SCALE_WORDS = 70  # words in a made-up body (the 300-character lead shows ~50)


def demo_text(db: Path) -> tuple[list[str], dict[str, list[str]]]:
    """The demo's titles in id order, and its bodies' word chain: word -> every word that
    follows it in some body (with repeats, so drawn as often as the corpus has it)."""
    con = sqlite3.connect(db)
    try:
        articles = con.execute("SELECT title, body FROM articles ORDER BY id").fetchall()
    finally:
        con.close()
    chain: dict[str, list[str]] = {}
    for _, body in articles:
        for a, b in pairwise(body.split()):
            chain.setdefault(a, []).append(b)
    return [t for t, _ in articles], chain


def scale_row(titles: list[str], chain: dict, seed: int, k: int) -> dict:
    """Made-up row k: title k mod len (" (k div len)" after it, as bench/warehouses.py grows
    a table), and a body walked along the demo's word chain from a random word (seeded by k):
    its word pairs are the corpus's, so two rows share the common ones ("of the"), as two
    unrelated articles do, and rarely more."""
    rng = random.Random(f"{seed}:{k}")
    copy, i = divmod(k, len(titles))
    words = [rng.choice(titles[rng.randrange(len(titles))].split())]
    while len(words) < SCALE_WORDS:
        words.append(rng.choice(chain.get(words[-1]) or list(chain)))
    return {"id": k + 1, "title": titles[i] if copy == 0 else f"{titles[i]} ({copy})",
            "body": " ".join(words)}


def scale_checks(titles: list[str], chain: dict, seed: int, n: int, checks: int
                 ) -> tuple[list[dict], int]:
    """(the training rows to check, how many of them come first as edited copies of indexed
    rows): a fifth are edited copies of rows < n, the rest new rows n, n+1, ..."""
    rng = random.Random(f"{seed}:checks")
    copies = checks // 5
    rows = []
    for _ in range(copies):
        row = scale_row(titles, chain, seed, rng.randrange(n))
        row["title"], row["body"], _ = edited_copy(row["title"], row["body"], rng)
        rows.append(row)
    rows += [scale_row(titles, chain, seed, n + i) for i in range(checks - copies)]
    return rows, copies


def _rss() -> int:
    """Resident memory now, bytes (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def scale_point(kind: str, spec, db: Path, n: int, checks: int, seed: int
                ) -> tuple[dict, list]:
    """Index n made-up held-out prompts with `kind` ("after": HeldOutIndex, "before":
    NearDuplicates), check the training prompts: (figures, verdicts [excerpt, similarity] or
    None, in the checks' order)."""
    import datasketch  # noqa: F401  (imported before the baseline: its ~50 MB are not the index's)

    from agents.text_diversity import NearDuplicates
    from flows.contamination import HeldOutIndex, _excerpt
    from flows.warehouse import render_prompt

    c = spec.contamination
    titles, chain = demo_text(db)
    items, copies = scale_checks(titles, chain, seed, n, checks)
    prompts = [render_prompt(spec, row) for row in items]
    made_up_s = 0.0  # making up and rendering the held-out rows, apart from the index's work

    def held():
        nonlocal made_up_s
        for k in range(n):
            t = time.perf_counter()
            prompt = render_prompt(spec, scale_row(titles, chain, seed, k))
            made_up_s += time.perf_counter() - t
            yield prompt

    rss = _rss()
    t0 = time.perf_counter()
    structure = {}
    if kind == "after":
        index = HeldOutIndex(held(), c.threshold, c.ngram, c.num_perm)
        match = index.match
        structure["index_bytes_per_row"] = round(index.nbytes / n)
    else:
        near = NearDuplicates(threshold=c.threshold, num_perm=c.num_perm, ngram=c.ngram)
        for k, prompt in enumerate(held()):
            near.add(str(k), prompt)

        def match(text: str):
            hit = near.find(text)
            return None if hit is None else (_excerpt(near.text_of(hit[0])), hit[1])
    build_s = time.perf_counter() - t0 - made_up_s
    rss_after, peak = _rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    verdicts = [match(p) for p in prompts]
    check_s = time.perf_counter() - t0
    return {"made_up_rows_s": round(made_up_s, 2), "build_s": round(build_s, 2),
            "build_ms_per_row": round(1000 * build_s / n, 3),
            **structure, "rss_bytes_per_row": round((rss_after - rss) / n),
            "peak_rss_bytes_per_row": round((peak - rss) / n),
            "check_s": round(check_s, 2), "check_rows_per_s": round(len(prompts) / check_s, 1),
            "copies_removed": sum(v is not None for v in verdicts[:copies]),
            "fresh_removed": sum(v is not None for v in verdicts[copies:])}, verdicts


def scale(args, folder: Path) -> dict:
    """The index at `args.scale` held-out prompts, each kind in its own process."""
    from flows.spec import load_spec

    db, spec_path = demo_copy(folder)
    spec = load_spec(spec_path)
    c = spec.contamination
    figures = {"scale": args.scale, "checks": args.checks, "copies": args.checks // 5,
               "fresh": args.checks - args.checks // 5, "threshold": c.threshold,
               "ngram": c.ngram, "num_perm": c.num_perm}
    verdicts = {}
    for kind in ["after", "before"] if args.compare else ["after"]:
        out = folder / f"scale-{kind}.json"
        cmd = [sys.executable, __file__, "--scale-point", kind, str(spec_path), str(db),
               str(out), "--scale", str(args.scale), "--checks", str(args.checks),
               "--seed", str(args.seed)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"scale point {kind} failed:\n{proc.stderr[-4000:]}")
        figures[kind], verdicts[kind] = json.loads(out.read_text())
    if args.compare:
        figures["verdicts_differing"] = sum(a != b for a, b in zip(verdicts["after"],
                                                                   verdicts["before"]))
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="60 injected rows, 2 sweep points")
    ap.add_argument("--injected", type=int, help="edited copies (default 60 quick, else 600)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="keep the warehouse copy here (default: a temp folder)")
    ap.add_argument("--scale", type=int, help="scale mode: an index of N made-up held-out "
                    "prompts, its build and check costs")
    ap.add_argument("--checks", type=int, default=5000, help="scale mode: prompts checked")
    ap.add_argument("--compare", action="store_true",
                    help="scale mode: also build the structure used before (NearDuplicates)")
    ap.add_argument("--scale-point", nargs=4, metavar=("KIND", "SPEC", "DB", "OUT"),
                    help=argparse.SUPPRESS)  # one scale point, in its own process
    args = ap.parse_args()
    from flows.spec import load_spec

    if args.scale_point:
        kind, spec_path, db, out = args.scale_point
        result = scale_point(kind, load_spec(spec_path), Path(db), args.scale, args.checks,
                             args.seed)
        Path(out).write_text(json.dumps(result))
        return
    folder = workdir(args.keep, "posttrain-contamination-")
    if args.scale:
        t0 = time.perf_counter()
        figures = scale(args, folder)
        figures["wall_s"] = round(time.perf_counter() - t0, 1)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        print(json.dumps(figures))
        return

    t0 = time.perf_counter()
    db, spec_path = demo_copy(folder)
    spec = load_spec(spec_path)
    injected, held = inject(db, spec, args.injected or (60 if args.quick else 600), args.seed)
    duplicates = genuine_duplicates(db, spec, injected)
    items = training_prompts(db, spec)
    default = spec.contamination.threshold
    figures = measure(spec, spec_path, items, injected, duplicates, default)
    sweep = [0.25, 0.35] if args.quick else [0.15, 0.2, 0.25, 0.35, 0.4, 0.5]
    figures["sweep"] = [{k: v for k, v in measure(spec, spec_path, items, injected, duplicates,
                                                  t).items()
                         if k in ("threshold", "injected_removed_share", "clean_removed",
                                  "clean_false_positives", "clean_removed_share",
                                  "check_seconds")} for t in sweep]
    figures.update(quick=args.quick, held_out=held,
                   index_bytes_per_row=index_bytes_per_row(spec, spec_path),
                   wall_s=round(time.perf_counter() - t0, 1))
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
