"""The run in one page (`summary.md`): what people check first, first.

Warnings that limit the data, the promotion decision, the metrics against the baselines, the
data (coverage, slices, gate rejections, tool misuse, drift alarms, stopped agents), the label
distribution by stage (or the answers' lengths), cost and time; the task kind writes its
metrics and data sections (flows/kinds). The same text is the MLflow run's description and the
Prefect summary artifact.
"""

from __future__ import annotations

from flows.contamination import report_lines as contamination_lines
from flows.reports.markdown import decision_lines, num, table
from flows.spec import Spec


def summary_markdown(spec: Spec, summary: dict, stages: dict[str, dict], slice_table: list[dict],
                     evaluation: dict | None, links: dict, plot_links: dict[str, str],
                     chosen_trial: int | None = None) -> str:
    """The run in one page: what people check first, first."""
    from flows.kinds import kind_of  # the kinds use this package's markdown helpers

    s = summary
    roles = spec.llm.roles()
    simulated = [n for n, r in roles.items() if r.simulated]
    lines = [f"# {spec.name}: post-training run {str(s['run_id'])[:8]}", ""]
    warnings = s.get("warnings") or []
    if warnings:  # what limits this run's data comes before anything else
        lines += ["**Completed with warnings:**", ""] + [f"- {w}" for w in warnings] + [""]
    lines += decision_lines(s, links)
    lines += ["", "Teacher: " + (f"posttrain's **SIMULATED** teacher plays {', '.join(simulated)}"
                                 if simulated else "real LLMs")
              + f" ({s.get('llm', '')})." + (" Resumed after an interrupted attempt."
                                              if s.get("resumed") else "")]

    # metrics
    n_eval = s.get("eval_examples")
    lines += ["", f"## Metrics on {n_eval} held-out rows", ""]
    ev = evaluation or {}

    kind = kind_of(spec)  # what the figures are: accuracy and labels, or win-rates
    lines += kind.report_metrics(s, ev)
    if s.get("dpo_reward_accuracy") is not None:
        pairs = s.get("dpo_pairs") or {}
        lines += ["", (f"DPO: reward accuracy {num(s['dpo_reward_accuracy'])}, reward margin "
                       f"{num(s.get('dpo_reward_margin'))} on {pairs.get('held_out', '?')} "
                       f"held-out pairs ({pairs.get('train', '?')} trained on).")]
    trials = s.get("tuning_trials") or []
    if trials:
        beats = s.get("tuning_beats_default")
        lines += ["", f"Tuning: {len(trials)} trials; "
                  + ("the chosen config beats the spec's default." if beats
                     else "the spec's default config stays."), ""]
        keys = sorted({k for t in trials for k in (t.get("config") or {})})
        lines += table(["trial", "source", *keys, "eval loss", "status"], [
            [f"{t['trial']}" + (" **chosen**" if t["trial"] == chosen_trial else ""),
             t.get("source", ""), *(num((t.get("config") or {}).get(k), 5) for k in keys),
             num(t.get("eval_loss"), 4), t.get("status", "")] for t in trials],
            align="ll" + "r" * (len(keys) + 1) + "l")
    if s.get("train_loss") is not None:
        lines += ["", f"SFT train loss {num(s['train_loss'], 4)}."]

    # data
    rejected = s.get("examples_rejected") or {}
    planned = sum(1 for r in slice_table if r["kind"] == "planned")
    lines += ["", "## Data", ""]
    rows_cov = s.get("coverage_rows") or {}
    lines += table(["", ""], [
        ["coverage (labelled / planned rows)",
         (f"**{num(s.get('coverage'))}** ({rows_cov.get('labelled_rows', '?')} of "
         f"{(rows_cov.get('planned_rows') or 0) - (rows_cov.get('excluded_rows') or 0)}; "
         f"{rows_cov.get('excluded_rows', 0)} copies of held-out rows excluded; "
         f"{rows_cov.get('disputed_rows', 0)} left unlabelled after two judge rejections)")],
        ["slices (agents)", (f"{planned} planned + {s.get('agent_retries', 0)} fresh agents "
         f"over left rows + {s.get('topup_slices', 0)} top-up")],
        ["examples accepted", s.get("examples_accepted")],
        ["examples rejected by the gates", sum(rejected.values())],
        ["curated for training", (f"{s.get('train_examples')} "
                                  f"({s.get('duplicates_dropped', 0)} duplicate(s), "
                                  f"{s.get('eval_copies_dropped', 0)} copy(ies) of held-out rows, "
                                  f"{s.get('quota_trimmed', 0)} trimmed by "
                                  f"{kind.curation_name})")],
        ["agents re-anchored", s.get("reanchors", 0)],
        ["largest agent context (tokens)", s.get("max_context_tokens", 0)],
    ])
    lines += ["", "Gate rejections by reason:" if rejected else "Gate rejections: none."]
    if rejected:
        lines += [""] + table(["reason", "count"], [[f"`{k}`", v] for k, v in rejected.items()])
    misuse = s.get("tool_misuse") or {}
    lines += ["", "Tool misuse:" if misuse else "Tool misuse: none."]
    if misuse:
        lines += [""] + table(["kind", "count"], [[f"`{k}`", v] for k, v in misuse.items()])
    alarms = s.get("drift_alarms") or []
    lines += ["", f"Drift alarms: {len(alarms)}." if alarms else "Drift alarms: none."]
    if alarms:
        lines += [""] + table(["slice", "at call", "time"], [
            [a.get("slice_id"), a.get("at_call"), num(a.get("time"), 1)] for a in alarms])
    stopped = s.get("agents_stopped") or {}
    if stopped:
        lines += ["", "Agents that stopped before finishing their slice:", ""]
        lines += table(["slice", "stopped"], [[k, v] for k, v in stopped.items()], align="ll")
    short = [c for c in s.get("coverage_by_slice") or [] if c.get("missing")]
    if short:
        lines += ["", "Slices with unlabelled rows:", ""]
        lines += table(["slice", "labelled", "planned", "excluded", "coverage", "agents"], [
            [c["slice_id"], c["labelled"], c["planned"], c["excluded"], num(c["coverage"]),
             "; ".join(c.get("agents") or [])] for c in short], align="lrrrrl")

    lines += contamination_lines(s.get("contamination"))  # near-copies of held-out rows

    # labels, or answers
    lines += kind.report_data(s, stages)

    lines += error_map_lines(s.get("error_map"))  # an error-driven run

    # cost
    by_role = s.get("cost_by_role") or {}
    lines += ["", "## Cost", ""]
    lines += table(["role", "USD"], [*([r, f"{v:.4f}"] for r, v in by_role.items()),
                                      ["**total**", f"**{s.get('cost_usd', 0.0):.4f}**"]])
    lines += ["", f"{s.get('llm_calls', 0)} LLM calls ({s.get('llm_errors', 0)} errors, "
              f"{s.get('cache_hits', 0)} served from the call cache), "
              f"{s.get('input_tokens', 0):,} input and {s.get('output_tokens', 0):,} output "
              "tokens." + (" Simulated models are priced as the real ones they stand for."
                           if simulated else "")]

    # time and pictures
    stages_s = s.get("stage_seconds") or {}
    if stages_s:
        lines += ["", f"Time: {num(s.get('wall_seconds'), 1)} s in all; "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in stages_s.items()) + "."]
    if plot_links:
        lines += ["", "Plots (MLflow): " + " · ".join(f"[{n}]({u})"
                                                     for n, u in plot_links.items())]
    return "\n".join(lines) + "\n"


def error_map_lines(emap: dict | None) -> list[str]:
    """The "Error map" section of an error-driven run (flows/error_driven.py): where the
    champion erred on the probe rows, and each label's F1 (each slice group's accuracy, where
    evaluation gives it) of the new model beside the champion's on the held-out rows."""
    if not emap:
        return []
    before, after = emap.get("before") or {}, emap.get("after") or {}
    weak = before.get("weak_labels") or []
    lines = ["", "## Error map", "",
             (f"Champion v{emap.get('champion_version')} on {before.get('n')} probe rows "
              f"labelled by this run's agents: accuracy {num(before.get('accuracy'))}; weak "
              f"labels {', '.join(weak) or 'none'}; groups given more turns: "
              f"{', '.join(before.get('focus_groups') or []) or 'none'}. The new model "
              + ("was fine-tuned from the champion's weights."
                 if emap.get("start_from_champion") else "was trained from a fresh student.")),
             ""]
    f1_after = after.get("f1") or {}
    lines += table(["label", "F1 on probes (champion)", "F1 held out (new)",
                    "F1 held out (champion)"],
                   [[f"**{k}**" if k in weak else k, num(v), num(f1_after.get(k, {}).get("final")),
                     num(f1_after.get(k, {}).get("champion"))]
                    for k, v in (before.get("f1") or {}).items()])
    groups = before.get("by_slice") or {}
    held = after.get("by_slice") or {}
    if groups:
        lines += [""] + table(["slice group", "probe rows", "champion error (probes)",
                               "accuracy held out (new)", "accuracy held out (champion)"],
                              [[g, m.get("n"), num(m.get("error")),
                                num((held.get(g, {}).get("final") or {}).get("accuracy")),
                                num((held.get(g, {}).get("champion") or {}).get("accuracy"))]
                               for g, m in sorted(groups.items(),
                                                  key=lambda x: -x[1].get("error", 0))])
    confusions = before.get("confusions") or []
    if confusions:
        lines += ["", "Champion's top confusions on the probes (agents' label -> champion's): "
                  + ", ".join(f"{c['gold']} -> {c['predicted']} ({c['count']})"
                              for c in confusions[:5]) + "."]
    return lines
