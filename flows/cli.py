"""`posttrain` command line.

    posttrain validate SPEC              ok, or one line per problem (exit 2)
    posttrain run SPEC [--out DIR]       the whole pipeline as one Prefect flow
    posttrain preview SPEC [--out DIR] [--slices N] [--rows M]
                                         a few capped agents' examples on screen, in seconds
    posttrain runs [--root DIR]          past runs from the example stores, with outcomes
    posttrain deploy [--timezone TZ]     register post-training/nightly (prefect.yaml)
    posttrain serve [--timezone TZ]      serve that deployment, schedule included
    posttrain ui                         Prefect server and MLflow UI on 127.0.0.1
    posttrain teacher --port P --warehouse URL [...]   the simulated teacher, standalone

`posttrain run` checks the spec, the API keys and the services (warehouse, example store,
MLflow, the Prefect API: flows/preflight.py) before Prefect starts; each failure is one line
naming the setting, exit 2. Without PREFECT_API_URL, Prefect's temporary API server is given
120 s to start ($PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, unless set); if it still
does not start, the message says what to set (exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flows.spec import SpecError, load_spec


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        load_spec(args.spec)
    except SpecError as e:
        for line in e.problems:
            print(line)
        return 2
    print("ok")
    return 0


def preflight(args: argparse.Namespace) -> int:
    """0, or 2 after one clear line: checked before Prefect starts."""
    from flows.preflight import ServiceUnavailable, check_services
    from flows.runtime import MissingKey, check_keys

    try:  # fail fast, before Prefect starts: a bad spec, a missing key or a service down is
        spec = load_spec(args.spec)  # one clear line (flows/preflight.py)
        check_keys(spec)
        for note in check_services(spec, Path(args.out)).notes:
            print(note)
    except SpecError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return 2
    except (MissingKey, ServiceUnavailable) as e:
        print(e, file=sys.stderr)
        return 2
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from flows.preflight import ServiceUnavailable

    if failed := preflight(args):
        return failed
    from flows.coverage import CoverageError
    from flows.pipeline import post_training

    try:
        summary = post_training(spec_path=str(Path(args.spec).resolve()), out_dir=args.out)
    except ServiceUnavailable as e:  # went down between the check and the flow's own check
        print(e, file=sys.stderr)
        return 2
    except CoverageError as e:  # the run stopped before training: say why, in one place
        print(f"posttrain run failed before training: {e}", file=sys.stderr)
        print(f"coverage per slice: {Path(args.out) / 'coverage.json'}", file=sys.stderr)
        return 1
    _print_summary(summary, Path(args.out))
    return 0


def cmd_preview(args: argparse.Namespace) -> int:
    """The post-training flow with preview=True (flows/preview.py): a few slices' agents,
    capped, their examples on screen; the calls cached for the full run in this folder."""
    from flows.preflight import ServiceUnavailable

    if args.slices < 1 or args.rows < 1:
        print("posttrain preview: --slices and --rows must be at least 1", file=sys.stderr)
        return 2
    if failed := preflight(args):
        return failed
    from flows.pipeline import post_training
    from flows.preview import print_preview

    try:
        result = post_training(spec_path=str(Path(args.spec).resolve()), out_dir=args.out,
                               preview=True, preview_slices=args.slices,
                               preview_rows=args.rows)
    except ServiceUnavailable as e:
        print(e, file=sys.stderr)
        return 2
    print_preview(result)
    return 0


def _print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"posttrain run {summary['run_id'][:8]}", show_header=False)
    for key in ("llm", "resumed", "slices", "examples_accepted", "examples_rejected",
                "tool_misuse", "llm_calls", "cache_hits", "input_tokens", "output_tokens",
                "cost_usd", "label_tv_after", "train_examples", "eval_examples",
                "coverage", "base_accuracy", "majority_baseline", "accuracy", "macro_f1",
                "model_name", "model_version", "promoted", "promotion_reason", "outcome",
                "wall_seconds"):
        value = summary.get(key)
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else json.dumps(value)
                      if isinstance(value, dict) else str(value))
    console = Console()
    console.print(table)
    for warning in summary.get("warnings") or []:
        console.print(f"[bold yellow]warning:[/] {warning}")
    console.print(f"summary: {out / 'summary.json'}")
    console.print(f"MLflow:  mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}"
                  f"   (run {summary['mlflow_run_id']})")


def cmd_runs(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from flows.store import Store

    urls = [args.store] if args.store else [
        f"sqlite:///{p.resolve()}" for p in sorted(Path(args.root).glob("**/store.db"))]
    table = Table(title=f"posttrain runs ({args.store or args.root})")
    for column in ("started", "run", "spec", "status", "accuracy", "SFT", "DPO reward acc",
                   "version", "promoted", "cost $", "folder"):
        table.add_column(column)
    rows = []
    for url in urls:
        store = Store(url)
        try:
            rows += [(run, url) for run in store.list_runs()]
        finally:
            store.close()
    rows.sort(key=lambda r: r[0]["started_at"] or "", reverse=True)
    for run, url in rows[: args.limit]:
        s = run["summary"] or {}
        status = run["status"] + (f" ({s['reason'][:60]})" if run["status"] == "skipped" else "")
        table.add_row(
            (run["started_at"] or "")[:19].replace("T", " "), run["id"][:8], run["name"], status,
            _fmt(s.get("accuracy")), _fmt(s.get("sft_accuracy")),
            _fmt(s.get("dpo_reward_accuracy")), str(s.get("model_version") or ""),
            {True: "yes", False: "no"}.get(s.get("promoted"), ""), _fmt(s.get("cost_usd")),
            str(Path(url.removeprefix("sqlite:///")).parent) if url.startswith("sqlite") else url)
    Console().print(table if rows else f"no runs under {args.store or args.root}")
    return 0


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "" if value is None else str(value)


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows.deploy import deploy

    return deploy(pool=args.pool, timezone=args.timezone)


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.deploy import serve

    serve(timezone=args.timezone)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from flows.ui import run_uis

    return run_uis(mlflow_uri=args.mlflow_uri, prefect_port=args.prefect_port,
                   mlflow_port=args.mlflow_port)


def cmd_teacher(args: argparse.Namespace) -> int:
    from agents.teacher import TeacherConfig, TeacherKnobs, serve_forever

    config, knobs = {}, {}
    if args.spec:
        try:
            spec = load_spec(args.spec)
        except SpecError as e:
            print("\n".join(e.problems), file=sys.stderr)
            return 2
        config = {"warehouse_url": spec.warehouse.url, "table": spec.slicing.table,
                  "id_column": spec.slicing.id_column, "gold_column": spec.task.gold_column,
                  "labels": spec.task.labels or [], "kind": spec.task.kind}
        knobs = spec.llm.simulated.model_dump()
    given = {"warehouse_url": args.warehouse, "table": args.table, "id_column": args.id_column,
             "gold_column": args.gold_column,
             "labels": args.labels.split(",") if args.labels else None}
    config.update({k: v for k, v in given.items() if v is not None})
    text = config.get("kind", "classification") != "classification"
    knobs.update({k: v for k, v in {"error_rate": args.error_rate,
                                    "off_spec_rate": args.off_spec_rate,
                                    "seed": args.seed}.items() if v is not None})
    missing = [k for k in ("warehouse_url", "table", "id_column", "gold_column",
                           *(() if text else ("labels",))) if config.get(k) is None]
    if missing:
        print("teacher: missing " + ", ".join("--" + m.replace("_url", "").replace("_", "-")
                                             for m in missing) + " (or pass --spec SPEC)",
              file=sys.stderr)
        return 2
    knobs = TeacherKnobs(**knobs)
    print(f"posttrain SIMULATED teacher on http://{args.host}:{args.port}/v1 (OpenAI chat "
          f"completions) and http://{args.host}:{args.port} (Anthropic messages); "
          f"{'answers' if text else 'labels'} from {config['gold_column']} with "
          f"{knobs.error_rate:.0%} noise", flush=True)
    serve_forever(TeacherConfig(**config, knobs=knobs, api_key=args.api_key,
                                request_log=args.request_log), host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="posttrain", description="Agentic LLM post-training.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a spec: prints ok or one line per problem")
    p.add_argument("spec")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="run the whole pipeline as one Prefect flow")
    p.add_argument("spec")
    p.add_argument("--out", default="runs/latest", help="run folder (summary.json goes here)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("preview", help="run a few slices' agents (capped) and show what they "
                       "write: nothing trained; the full run reuses their calls")
    p.add_argument("spec")
    p.add_argument("--out", default="runs/latest", help="run folder (the later `posttrain run "
                   "--out` of the same folder gets the preview's calls from its cache)")
    p.add_argument("--slices", type=int, default=2, help="slices to preview (default 2: the "
                   "largest distinct groups)")
    p.add_argument("--rows", type=int, default=25, help="rows per slice that get a verdict "
                   "before its agent stops (default 25)")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("runs", help="list past runs from the example stores with their outcome")
    p.add_argument("--root", default="runs", help="folder searched for */store.db")
    p.add_argument("--store", help="one example store URL instead (e.g. postgresql://...)")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("deploy", help="register the post-training/nightly deployment "
                       "(prefect.yaml) on a process work pool")
    p.add_argument("--pool", help="work pool (default: prefect.yaml's, created if missing)")
    p.add_argument("--timezone", help="schedule timezone, e.g. Europe/Paris (default: "
                   "prefect.yaml's)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("serve", help="serve post-training/nightly from this process")
    p.add_argument("--timezone", help="schedule timezone (default: prefect.yaml's)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ui", help="start the Prefect server and the MLflow UI on 127.0.0.1")
    p.add_argument("--mlflow-uri", help="MLflow backend store (default: $MLFLOW_TRACKING_URI, "
                   "else sqlite:///runs/mlflow.db)")
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("teacher", help="serve the simulated teacher (OpenAI and Anthropic "
                       "wire formats)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--warehouse", help="SQLAlchemy URL of the warehouse holding the gold labels")
    p.add_argument("--spec", help="take table, columns, labels and noise from this spec")
    p.add_argument("--table")
    p.add_argument("--id-column")
    p.add_argument("--gold-column")
    p.add_argument("--labels", help="comma-separated label set")
    p.add_argument("--error-rate", type=float)
    p.add_argument("--off-spec-rate", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--api-key", help="require this bearer key (default: accept any)")
    p.add_argument("--request-log", help="append every request to this JSONL file")
    p.set_defaults(func=cmd_teacher)
    return ap


# Prefect's temporary API server (no PREFECT_API_URL) gets 20 s to start by default: too few on
# a busy machine, where a slow start is not a failure.
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_TIMEOUT_DEFAULT = "120"
EPHEMERAL_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"


def ephemeral_startup_help() -> str:
    """What to set when Prefect's temporary API server did not start in time."""
    waited = os.environ.get(STARTUP_TIMEOUT_ENV, "20")
    return (f"posttrain: Prefect's temporary API server did not start within {waited} s "
            f"(${STARTUP_TIMEOUT_ENV}={waited}). On a busy machine give it longer, e.g. "
            f"export {STARTUP_TIMEOUT_ENV}=300, or run against a running Prefect server: "
            f"prefect server start, then export PREFECT_API_URL=http://127.0.0.1:4200/api")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault(STARTUP_TIMEOUT_ENV, STARTUP_TIMEOUT_DEFAULT)  # before Prefect reads it
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not str(e).startswith(EPHEMERAL_TIMEOUT):
            raise
        print(ephemeral_startup_help(), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
