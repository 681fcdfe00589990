"""Markdown pieces the summary page and the model card share: numbers, tables, the label
table by stage, the promotion decision, and clipping to what MLflow's fields hold."""

from __future__ import annotations


def num(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(header: list[str], rows: list[list], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    cells = ["---" if a == "l" else "---:" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(cells) + " |"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |"
            for r in rows]
    return out


def label_table(stages: dict[str, dict], labels: list[str]) -> list[str]:
    names = list(stages)
    extra = sorted({k for c in stages.values() for k in c} - set(labels))
    rows = [[f"`{label}`", *(stages[n].get(label, 0) for n in names)]
            for label in [*labels, *extra]]
    rows.append(["**total**", *(f"**{sum(stages[n].values())}**" for n in names)])
    return table(["label", *names], rows)


def decision_lines(summary: dict, links: dict) -> list[str]:
    name, version = summary["model_name"], summary["model_version"]
    verdict = ("**promoted to champion**" if summary["promoted"]
               else "**not promoted** (the champion alias stays"
               + (f" on v{summary['previous_champion_version']})"
                  if summary.get("previous_champion_version") else ")"))
    lines = [f"**{name} v{version}**: {verdict}. Reason: {summary['promotion_reason']}."]
    approval = summary.get("approval")
    if approval:
        if approval.get("timed_out"):
            lines.append("Approval: no answer before the timeout.")
        else:
            who = approval.get("reviewer") or "a reviewer"
            said = "approved" if approval.get("approved") else "rejected"
            comment = f': "{approval["comment"]}"' if approval.get("comment") else ""
            lines.append(f"Approval: {said} by {who}{comment}.")
    else:
        lines.append("Approval: none asked (the spec's rule decided).")
    lines.append(f"MLflow run: [{summary['mlflow_run_id']}]({links['run']}) · "
                 f"model version: [{name} v{version}]({links['model_version']})")
    return lines


def clip(text: str, limit: int, where: str) -> str:
    if len(text) <= limit:
        return text
    tail = f"\n\n… (cut to fit; the whole text is {where})\n"
    return text[: limit - len(tail)] + tail
