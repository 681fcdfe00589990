"""The model card (`model_card.md`): the registered version explained.

What it is for, what it learnt from, how it scores, why it is (or is not) the champion, and
where it came from (the version's lineage tags). It is also the version's description in the
MLflow registry.
"""

from __future__ import annotations

from flows.contamination import report_lines as contamination_lines
from flows.reports.markdown import decision_lines, num, table
from flows.spec import Spec


def model_card(spec: Spec, summary: dict, evaluation: dict | None, version_tags: dict,
               dataset: dict, stages_run: list[str], train_result: dict,
               dpo_result: dict | None, tuned: dict | None, links: dict) -> str:
    """The registered model version explained: what it is for, what it learnt from, how it
    scores, why it is (or is not) the champion, and where it came from."""
    s = summary
    roles = spec.llm.roles()
    labels = spec.task.labels
    answers = ("one of the labels. Out of scope: other labels, and inputs unlike these prompts"
               if labels else f"its answer ({'a JSON record' if spec.task.answer_schema else 'text'}"
               f"). Out of scope: inputs unlike these prompts")
    lines = [f"# Model card: {s['model_name']} v{s['model_version']}", "",
             "## Intended use", "", spec.task.description, "",
             (f"A {spec.task.kind} model: given a prompt rendered from "
              f"`{spec.slicing.table}` rows with the template below, it completes it with "
              f"{answers}."), "", "```", spec.task.prompt_template, "```", ""]
    if labels:
        lines += ["## Labels", "", ", ".join(f"`{x}`" for x in labels), ""]
    elif spec.task.instructions:
        lines += ["## Instructions", "", spec.task.instructions, ""]
    lines += ["## Training data", ""]
    sha = dataset.get("sha256")
    lines += [f"- {s.get('train_examples')} curated prompt/completion examples"
              + (f", {dataset['bytes']:,} bytes" if dataset.get("bytes") else "")
              + (f", sha256 `{sha}`" if sha else "") + " (`dataset/train.jsonl` on the run).",
              (f"- Written and labelled by LLM sub-agents over {s.get('slices')} slices of "
               f"`{spec.slicing.table}` (+{s.get('topup_slices', 0)} top-up); every example "
               f"passed the gates ({s.get('examples_accepted')} accepted, "
               f"{sum((s.get('examples_rejected') or {}).values())} rejected); "
               f"dropped: {s.get('duplicates_dropped', 0)} duplicate(s), "
               f"{s.get('eval_copies_dropped', 0)} copy(ies) of held-out rows."),
              "- Teacher: " + ("**SIMULATED** (posttrain's local stand-in that answers from "
                               "the gold labels with configured noise)"
                               if s.get("teacher") == "simulated" else "real LLMs") + ".",
              "- LLM roles: " + "; ".join(
                  f"{n} = {r.api}:{r.model}" + (" (simulated)" if r.simulated else "")
                  for n, r in roles.items()) + ".",
              "- Labels in the curated set: " + ", ".join(
                  f"{k} {(s.get('label_counts') or {}).get(k, 0)}" for k in labels) + "."
              if labels else f"- Near-duplicate answers dropped: "
              f"{s.get('near_duplicates_dropped', 0)}."]
    lines += contamination_lines(s.get("contamination"))  # near-copies of held-out rows
    lines += ["", "## Training", ""]
    student = spec.student
    tiny = student.tiny
    base = (f"a tiny {tiny.architecture} causal LM built from a config (hidden "
            f"{tiny.hidden_size} × {tiny.num_layers} layers, {tiny.num_heads} heads, BPE "
            f"vocabulary {tiny.vocab_size} trained on the curated prompts; "
            f"{train_result.get('num_parameters', '?'):,} parameters)"
            if student.source == "tiny" else f"`{student.name_or_path}`")
    lines += [f"- Base model: {base}.", f"- Stages: {' → '.join(stages_run)}."]
    lines += [f"- **Degraded: {d['stage']} failed** ({d['reason']}); {d['fallback']}."
              for d in s.get("degraded") or ()]
    if tuned:
        lines.append(f"- Tuning: {len(tuned.get('trials', []))} trials; chosen trial "
                     f"{tuned.get('chosen_trial')} (eval loss {num(tuned.get('best_eval_loss'), 4)}"
                     f" vs default {num(tuned.get('default_eval_loss'), 4)}).")
    config = s.get("chosen_config") or {}
    lines.append(f"- SFT: {train_result.get('steps', '?')} steps, "
                 + ", ".join(f"{k} {v}" for k, v in config.items())
                 + f"; train loss {num(train_result.get('train_loss'), 4)}.")
    if dpo_result:
        lines.append(f"- DPO: {dpo_result.get('steps', '?')} steps on "
                     f"{dpo_result.get('n_train', '?')} pairs, beta {dpo_result.get('beta')}, "
                     f"loss {dpo_result.get('loss_type')}; held-out reward accuracy "
                     f"{num(dpo_result.get('reward_accuracy'))}, margin "
                     f"{num(dpo_result.get('reward_margin'))}.")
    ev = evaluation or {}
    lines += ["", f"## Evaluation on {s.get('eval_examples')} held-out rows", "",
              ("Rows chosen by a hash of their id before slicing: no agent saw them and no "
               "training example equals one."), ""]
    if labels:
        rows = [[name, num((ev.get(key) or {}).get("accuracy")),
                 num((ev.get(key) or {}).get("macro_f1"))]
                for name, key in (("base", "base"), ("after SFT", "sft"),
                                  ("**this model**", "final"),
                                  (f"champion v{ev.get('champion_version')}", "champion"))
                if ev.get(key)]
        if not rows:
            rows = [["**this model**", num(s.get("accuracy")), num(s.get("macro_f1"))]]
        lines += table(["model", "accuracy", "macro-F1"], rows)
    else:
        from flows.kinds import kind_of  # the kinds use this package's markdown helpers

        lines += kind_of(spec).report_metrics(s, ev)
    per_label = (ev.get("final") or {}).get("per_label") or {}
    if per_label:
        lines += ["", "Per label (this model):", ""]
        lines += table(["label", "precision", "recall", "F1", "support"], [
            [f"`{k}`", num(m["precision"]), num(m["recall"]), num(m["f1"]), m["support"]]
            for k, m in per_label.items()])
        if (ev.get("final") or {}).get("invalid"):
            lines += ["", f"{ev['final']['invalid']} answers matched no label (counted wrong)."]
    lines += ["", "## Promotion", ""] + decision_lines(s, links)
    lineage = {k: v for k, v in sorted(version_tags.items()) if k.startswith("posttrain.")}
    if lineage:
        lines += ["", "## Lineage", ""]
        lines += table(["tag", "value"], [[f"`{k}`", f"`{v}`"] for k, v in lineage.items()],
                        align="ll")
    return "\n".join(lines) + "\n"
