"""`posttrain preview`: what the agents will write, before paying for a whole run.

    post_training(spec_path, out_dir, preview=True)     (or: posttrain preview SPEC --out DIR)
      plan ─> pick N slices (the largest distinct groups) ─> their sub-agents, each stopped
      once M rows of its slice got a verdict ─> the examples accepted and rejected, on screen
      (rich) and as Prefect artifacts; nothing curated, trained or registered

The agents are the generation stage's own (`label_slice`: gates, judge sampling, drift, the
example store); only `AgentConfig.stop_after_rows` differs, and it ends the loop *between*
calls, so every request a previewed agent sent is byte-identical to one the same slice's agent
in a full run sends first: the full run in the same folder (the same example store, whose call
cache is keyed by the request's content) gets those replies back free. The preview is a store
run of its own with status "preview": the folder's run marker is left alone, so the next full
run never resumes it, and reads its own run id's examples, never the preview's.
"""

from __future__ import annotations

from collections import Counter

import sqlalchemy as sa
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.agent_runners import EventLoopRunner
from flows.generation import label_slice
from flows.progress import StageClock
from flows.reports.links import slug
from flows.reports.prefect_artifacts import in_prefect_run
from flows.run_lifecycle import PostTrainingRun
from flows.runtime import RuntimeSettings
from flows.slicing import SliceDescriptor, fetch_slice_rows
from flows.store_tables import Example
from flows.warehouse import render_prompt, shared_engine

EXCERPT = 90  # characters of a prompt shown in the table


# ── which slices ────────────────────────────────────────────────────────────────────────────
def pick_slices(slices: list[SliceDescriptor], n: int) -> list[SliceDescriptor]:
    """`n` slices spread over the plan: the first part of each of the `n` largest groups (a
    hot group split by the row cap counts once, by its total), then further parts of those
    groups in turn if the plan has fewer groups than `n`. Plan order breaks ties."""
    groups: dict[str, list[SliceDescriptor]] = {}
    for s in slices:
        groups.setdefault(s.slice_id.split("#", 1)[0], []).append(s)
    ranked = sorted(groups.values(), key=lambda parts: -sum(p.row_count for p in parts))
    picked: list[SliceDescriptor] = []
    for depth in range(max((len(p) for p in ranked), default=0)):
        picked += [parts[depth] for parts in ranked if depth < len(parts)]
    return picked[:max(n, 0)]


# ── the agents ──────────────────────────────────────────────────────────────────────────────
@task(name="preview-slice", cache_policy=NO_CACHE, task_run_name="preview {descriptor.slice_id}")
async def apreview_slice(descriptor: SliceDescriptor, settings: RuntimeSettings,
                         progress_id: str, rows: int) -> dict:
    """The slice's sub-agent exactly as a full run starts it, stopped after `rows` verdicts."""
    return await label_slice(descriptor, settings, progress_id, None, None,
                             stop_after_rows=rows)


def run_preview(run: PostTrainingRun, slices: list[SliceDescriptor], settings: RuntimeSettings,
                n_slices: int, n_rows: int) -> dict:
    """Run the previewed agents (one task run each, on one event loop), record the store run
    as "preview", publish the artifacts and return the preview: figures and every example."""
    spec, store = run.spec, run.store
    picked = pick_slices(slices, n_slices)
    stage = StageClock(run.progress)

    def settle(i: int, outcome: dict | Exception) -> dict:
        if not isinstance(outcome, Exception):
            return outcome
        reason = f"failed: {type(outcome).__name__}: {str(outcome)[:300]}"
        store.update_slice(run.id, picked[i].slice_id, status="failed", stopped_reason=reason)
        return {"slice_id": picked[i].slice_id, "accepted": 0, "rejected": 0,
                "stopped_reason": reason}

    with stage("preview", "preview agents", n_rows * len(picked), bar_key="generate"):
        agents = EventLoopRunner(max(len(picked), 1)).run(apreview_slice, [
            {"descriptor": s, "settings": settings, "progress_id": run.progress.id,
             "rows": n_rows} for s in picked], settle)
    examples = preview_examples(run, picked)
    calls = store.call_totals(run.id)
    result = {
        "preview": True, "run_id": run.id, "mlflow_run_id": run.mlflow_run_id,
        "spec": spec.name, "out_dir": str(run.out), "planned_slices": len(slices),
        "planned_rows": sum(s.row_count for s in slices), "rows_per_slice": n_rows,
        "slices": [{"slice_id": a["slice_id"], "rows": s.row_count,
                    "accepted": a["accepted"], "rejected": a["rejected"],
                    "stopped_reason": a["stopped_reason"]} for a, s in zip(agents, picked,
                                                                          strict=True)],
        "examples_accepted": sum(e["status"] == "accepted" for e in examples),
        "examples_rejected": dict(Counter(e["reason"] for e in examples
                                          if e["status"] == "rejected")),
        "llm_calls": calls["calls"], "cache_hits": calls["cache_hits"],
        "input_tokens": calls["input_tokens"], "output_tokens": calls["output_tokens"],
        "cost_usd": calls["cost_usd"], "wall_seconds": run.elapsed(),
        "stage_seconds": stage.seconds,
    }
    store.finish_run(run.id, "preview", result)  # never resumed: see flows/run_lifecycle.py
    if in_prefect_run():
        result["artifacts"] = publish_preview(run, result, examples)
    return {**result, "examples": examples}


def preview_examples(run: PostTrainingRun, picked: list[SliceDescriptor]) -> list[dict]:
    """Every example the previewed agents submitted, in slice then row order; a rejected one
    gets its row's prompt from the warehouse (the store keeps prompts of accepted ones)."""
    order = {s.slice_id: i for i, s in enumerate(picked)}
    with run.store.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(
            sa.select(Example.slice_id, Example.row_id, Example.prompt, Example.label,
                      Example.status, Example.reason)
            .where(Example.run_id == run.id, Example.slice_id.in_(list(order)))
            .order_by(Example.id)).mappings()]
    engine = shared_engine(run.spec.warehouse.url)
    for s in picked:
        missing = [r["row_id"] for r in rows if r["slice_id"] == s.slice_id and not r["prompt"]]
        found = fetch_slice_rows(engine, s, missing) if missing else {}
        for r in rows:
            if r["slice_id"] == s.slice_id and not r["prompt"] and r["row_id"] in found:
                r["prompt"] = render_prompt(run.spec, found[r["row_id"]])
    rows.sort(key=lambda r: (order[r["slice_id"]], _row_order(r["row_id"]),
                             r["status"] != "rejected"))
    return [{**r, "prompt": _excerpt(r["prompt"] or "")} for r in rows]


def _row_order(row_id: str | None) -> tuple:
    try:
        return (0, float(row_id or ""), "")
    except ValueError:
        return (1, 0.0, str(row_id))


def _excerpt(text: str, limit: int = EXCERPT) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


# ── what a person sees ──────────────────────────────────────────────────────────────────────
def figures_line(p: dict) -> str:
    rejected = p["examples_rejected"]
    why = f" ({', '.join(f'{k} {n}' for k, n in rejected.items())})" if rejected else ""
    return (f"{len(p['slices'])} of {p['planned_slices']} slices, {p['rows_per_slice']} rows "
            f"each: {p['examples_accepted']} accepted, {sum(rejected.values())} rejected{why}; "
            f"{p['llm_calls']} LLM calls, {p['cache_hits']} cache hits, "
            f"${p['cost_usd']:.4f}, {p['wall_seconds']:.1f} s")


def print_preview(p: dict) -> None:
    """The preview on screen: one row per example, then the figures."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"posttrain preview {p['spec']} (run {p['run_id'][:8]})")
    for column in ("slice", "row", "prompt", "label", "status", "reason"):  # a line each
        table.add_column(column, no_wrap=True, overflow="ellipsis",
                         ratio=1 if column == "prompt" else None)
    for e in p["examples"]:
        ok = e["status"] == "accepted"
        table.add_row(e["slice_id"], str(e["row_id"]), e["prompt"], str(e["label"] or ""),
                      "[green]accepted[/]" if ok else "[red]rejected[/]", e["reason"] or "")
    console = Console()
    console.print(table)
    for s in p["slices"]:
        console.print(f"{s['slice_id']} ({s['rows']} rows): {s['accepted']} accepted, "
                      f"{s['rejected']} rejected, stopped: {s['stopped_reason']}")
    console.print(figures_line(p))
    console.print(f"the same out folder's `posttrain run` gets these calls from its cache: "
                  f"{p['out_dir']}")


def publish_preview(run: PostTrainingRun, p: dict, examples: list[dict]) -> dict[str, str]:
    """`<name>-preview` (table: one row per example) and `<name>-preview-summary` (markdown)
    on the flow run's Artifacts tab."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = f"{slug(run.spec.name)}-preview"
    table = [{"slice": e["slice_id"], "row": e["row_id"], "prompt": e["prompt"],
              "label": e["label"] or "", "status": e["status"], "reason": e["reason"] or ""}
             for e in examples]
    lines = [f"# Preview of {run.spec.name} (run {run.id[:8]})", "", figures_line(p), "",
             "| slice | rows | accepted | rejected | stopped |", "|---|---|---|---|---|"]
    lines += [f"| {s['slice_id']} | {s['rows']} | {s['accepted']} | {s['rejected']} | "
              f"{s['stopped_reason']} |" for s in p["slices"]]
    lines += ["", ("Nothing was trained or registered. A full run with out_dir "
                   f"`{p['out_dir']}` gets these LLM calls from its call cache.")]
    return {
        key: str(create_table_artifact(table=table, key=key, _sync=True,
                                       description=f"{run.spec.name}: preview examples")),
        f"{key}-summary": str(create_markdown_artifact(
            markdown="\n".join(lines), key=f"{key}-summary", _sync=True,
            description=f"{run.spec.name}: preview {run.id[:8]}")),
    }
