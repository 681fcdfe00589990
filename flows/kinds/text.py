"""What generation and extraction share: an answer written, not picked, so a judge with a
rubric reviews it and a pairwise judge compares models on it.

    answer      text within `task.rules` (generation) or a JSON object valid against
                `task.answer_schema` (extraction); the submit tool's `response`
    review      agents.judge.RubricJudge: every `task.rubric` criterion scored 1-5; under the
                threshold the answer goes back to its agent with the judge's reason
    score       greedy decoding of each held-out prompt; reference metrics against the gold
                column where there is one (the subclass's `reference`)
    head_to_head  agents.pairwise.PairwiseJudge: the final model against the base model and the
                champion, each row shown in both orders, ties counted apart
    decide      the win-rate's Wilson lower bound against the champion (else the base model),
                at least `min_rows` rows, and the reference metric: above the base model's,
                not more than `max_reference_drop` under the champion's
    pairs       the curated answer (chosen) against the SFT model's own output (rejected),
                kept where the judge prefers the curated answer in both orders
"""

from __future__ import annotations

import json
from pathlib import Path

from agents.judge import RubricJudge
from agents.pairs import Pair, PairsResult
from agents.pairwise import PairwiseJudge
from agents.providers import ProviderError
from agents.skills import load_skill
from flows.render import render_completion, render_prompt
from flows.reports.markdown import num, table
from flows.slicing import slice_group
from flows.spec import Spec
from training.evaluate import generate_texts
from training.registry import decide_win_rate_promotion

OUTPUTS = "outputs"  # a model's decoded answers in its scores (kept out of eval.json)
NOT_PREFERRED = "judge_not_preferred"  # a pair the judge did not decide for the curated answer


class TextKind:
    name = "text"
    judge_skills = ("review-answers", "compare-answers")
    curation_name = "near-duplicate answers"
    references: tuple[str, ...] = ()  # the reference metrics, the promotion one first

    def __init__(self, spec: Spec):
        self.spec = spec
        self.task = spec.task
        self.metric = spec.evaluation.promotion.metric

    # ── what agents are asked for ───────────────────────────────────────────────────────
    def agent_task(self) -> dict:
        t = self.task
        return {"kind": t.kind, "instructions": t.instructions,
                "rules": t.rules.model_dump(mode="json") if t.rules else None,
                "answer_schema": t.answer_schema}

    def near_duplicates(self):
        return None

    def completion(self, answer: str) -> str:
        return render_completion(self.spec, answer)

    def _rubric(self) -> dict:
        return self.task.rubric.model_dump(mode="json")

    def judge(self, gateway, role) -> RubricJudge:
        rubric = self.task.rubric
        return RubricJudge(gateway, model=role.model, skill=load_skill("review-answers"),
                           kind=self.task.kind,
                           criteria=[c.model_dump() for c in rubric.criteria],
                           threshold=rubric.threshold, instructions=self.task.instructions,
                           rules=self.agent_task()["rules"], temperature=role.temperature,
                           max_tokens=role.max_tokens)

    def pairwise_judge(self, gateway, role) -> PairwiseJudge:
        return PairwiseJudge(gateway, model=role.model, skill=load_skill("compare-answers"),
                             instructions=self.task.instructions,
                             rules=self.agent_task()["rules"], rubric=self._rubric(),
                             temperature=role.temperature, max_tokens=max(role.max_tokens, 4000))

    # ── scoring one model ───────────────────────────────────────────────────────────────
    def parse(self, text: str):
        """A decoded completion as an answer (the first line, stripped)."""
        return text.strip().split("\n", 1)[0].strip()

    def gold(self, rows: list[dict]) -> list | None:
        column = self.task.gold_column
        if column is None or not rows or any(r.get(column) is None for r in rows):
            return None
        return [r[column] for r in rows]

    def reference(self, outputs: list, gold: list) -> dict:
        """Reference metrics of `outputs` against `gold` (the subclass's)."""
        raise NotImplementedError

    def answers(self, model_dir: str | Path, rows: list[dict]) -> list:
        texts = generate_texts(str(model_dir), [render_prompt(self.spec, r) for r in rows],
                               max_new_tokens=self.spec.evaluation.max_new_tokens)
        return [self.parse(t) for t in texts]

    def score(self, model_dir: str | Path, rows: list[dict]) -> dict:
        outputs = self.answers(model_dir, rows)
        rule = self.answer_rule()
        valid = sum(rule.check(o).ok for o in outputs)
        scores = {"n": len(rows), OUTPUTS: outputs,
                  "valid_share": valid / len(outputs) if outputs else 0.0}
        gold = self.gold(rows)
        if gold is not None:
            scores |= self.reference(outputs, gold)
        return scores

    def baseline(self, rows: list[dict]) -> dict:
        return {}  # the base model is the floor: the judge and the references compare with it

    # ── the judge's comparisons ─────────────────────────────────────────────────────────
    def head_to_head(self, ev: dict, rows: list[dict], runtime) -> dict:
        """The final model against the base model and the champion, by the pairwise judge."""
        judge = self.pairwise_judge(runtime.gateways["judge"], self.spec.llm.judge)
        items = [{"row_id": r[self.spec.slicing.id_column],
                  "prompt": render_prompt(self.spec, r)} for r in rows]
        final = ev["final"][OUTPUTS]
        out = {"versus_base": judge.compare(final, ev["base"][OUTPUTS], items,
                                            agent="evaluation/versus-base"),
               "versus_champion": None}
        if ev.get("champion"):
            out["versus_champion"] = judge.compare(final, ev["champion"][OUTPUTS], items,
                                                   agent="evaluation/versus-champion")
            out["versus_champion_by_slice"] = verdicts_by_slice(
                out["versus_champion"]["per_row"], [slice_group(self.spec, r) for r in rows])
        return out

    # ── what the evaluation reads as ────────────────────────────────────────────────────
    def _ref(self, scores: dict | None) -> float | None:
        return None if not scores else scores.get(self.metric)

    def describe(self, ev: dict) -> str:
        vb, vc = ev["versus_base"], ev.get("versus_champion")
        refs = ("" if self._ref(ev["final"]) is None else
                f"held-out {self.metric}: base {ev['base'][self.metric]:.3f} -> SFT "
                f"{ev['sft'][self.metric]:.3f} -> final {ev['final'][self.metric]:.3f}; ")
        return (f"{refs}judge: final beats base on {vb['wins']} of {vb['n']} rows ({vb['losses']} "
                f"losses, {vb['ties']} ties, win-rate {vb['win_rate']:.3f}, lower bound "
                f"{vb['lower']:.3f}); " + (
                    f"champion v{ev['champion_version']}: {vc['wins']} wins, {vc['losses']} "
                    f"losses, {vc['ties']} ties, lower bound {vc['lower']:.3f}" if vc
                    else "no champion"))

    def compare(self, ev: dict) -> str:
        against = ev.get("versus_champion") or ev["versus_base"]
        who = "champion" if ev.get("versus_champion") else "base model"
        ref = self._ref(ev["final"])
        return (f"judge win-rate {against['win_rate']:.3f} (lower bound {against['lower']:.3f}) "
                f"against the {who}" + (f", {self.metric} {ref:.3f}" if ref is not None else ""))

    def metrics(self, ev: dict, dpo: dict | None) -> dict[str, float]:
        out: dict[str, float] = {"valid_share": ev["final"]["valid_share"]}
        for name in self.references:
            if self._has(ev["final"], name):
                out |= {name: ev["final"][name], f"base_{name}": ev["base"][name],
                        f"sft_{name}": ev["sft"][name]}
        for who in ("base", "champion"):
            verdicts = ev.get(f"versus_{who}")
            if verdicts:
                out |= {f"win_rate_vs_{who}": verdicts["win_rate"],
                        f"win_lower_vs_{who}": verdicts["lower"],
                        f"ties_vs_{who}": verdicts["ties"]}
        if dpo:
            out["dpo_reward_accuracy"] = dpo["reward_accuracy"]
        return out

    @staticmethod
    def _has(scores: dict | None, name: str) -> bool:
        return bool(scores) and isinstance(scores.get(name), int | float)

    def decide(self, ev: dict) -> dict:
        rule = self.spec.evaluation.promotion
        final, base, champion = ev["final"], ev["base"], ev.get("champion")
        decision = decide_win_rate_promotion(
            ev.get("versus_champion"), ev["versus_base"], min_rows=rule.min_rows,
            min_lower_bound=rule.min_win_lower_bound, candidate_reference=self._ref(final),
            champion_reference=self._ref(champion), reference_metric=self.metric,
            max_reference_drop=rule.max_reference_drop)
        weak = []
        against = ev.get("versus_champion") or ev["versus_base"]
        decided = against["decided"] / against["n"] if against["n"] else 0.0
        if decided < rule.min_decided_share:  # the judge could not tell them apart
            weak.append(f"the judge decided only {against['decided']} of {against['n']} rows "
                        f"({decided:.0%}; the others tied), under the "
                        f"{rule.min_decided_share:.0%} the rule needs")
        if rule.max_slice_drop is not None:  # the judge preferred the champion on a slice
            weak += [f"slice '{g}': the judge preferred the champion on {v['losses']} of "
                     f"{v['n']} rows, the new model on {v['wins']} (net {v['net']:+.3f} < "
                     f"-{rule.max_slice_drop:g})"
                     for g, v in (ev.get("versus_champion_by_slice") or {}).items()
                     if v["n"] >= rule.min_slice_rows and v["net"] < -rule.max_slice_drop]
        ref, floor = self._ref(final), self._ref(base)
        if ref is not None and floor is not None and not ref > floor:
            weak.append(f"{self.metric} {ref:.3f} does not beat the base model's {floor:.3f}")
        if weak:
            return {"promote": False, "reason": "; ".join(
                ([] if decision["promote"] else [decision["reason"]]) + weak)}
        return decision

    # ── reports ─────────────────────────────────────────────────────────────────────────
    def write_reports(self, ev: dict, rows: list[dict], eval_dir: Path) -> list[Path]:
        """outputs.jsonl: every held-out row's answers by model; samples.md: the first 30."""
        gold = self.gold(rows) or [None] * len(rows)
        models = [m for m in ("base", "sft", "final", "champion") if ev.get(m)]
        vb = ev["versus_base"]["per_row"] if ev.get("versus_base") else [None] * len(rows)
        lines = []
        for i, row in enumerate(rows):
            lines.append(json.dumps({
                "row_id": row[self.spec.slicing.id_column], "gold": gold[i],
                **{m: ev[m][OUTPUTS][i] for m in models},
                "versus_base": vb[i]["outcome"] if vb[i] else None},
                ensure_ascii=False, default=str) + "\n")
        (eval_dir / "outputs.jsonl").write_text("".join(lines))
        shown = [[str(row[self.spec.slicing.id_column]), _cell(gold[i]),
                  *(_cell(ev[m][OUTPUTS][i]) for m in models),
                  vb[i]["outcome"] if vb[i] else ""] for i, row in enumerate(rows[:30])]
        report = [f"# Answers on {len(rows)} held-out rows (the first 30)", "",
                  self.describe(ev), ""]
        report += table(["row", "gold", *models, "final vs base"], shown)
        (eval_dir / "samples.md").write_text("\n".join(report) + "\n")
        return [eval_dir / "samples.md", eval_dir / "outputs.jsonl"]

    def summary(self, ev: dict, dataset: dict) -> dict:
        """The run summary's figures for this kind."""
        vb, vc = ev["versus_base"], ev.get("versus_champion")
        figures = {"valid_share": ev["final"]["valid_share"],
                   "base_valid_share": ev["base"]["valid_share"],
                   "win_rate_vs_base": _verdict_figures(vb),
                   "win_rate_vs_champion": _verdict_figures(vc) if vc else None,
                   "near_duplicates_dropped": dataset.get("near_duplicates", 0),
                   "answer_lengths": dataset.get("answer_lengths")}
        for name in self.references:
            if self._has(ev["final"], name):
                figures |= {name: ev["final"][name], f"base_{name}": ev["base"][name],
                            f"sft_{name}": ev["sft"][name],
                            f"champion_{name}": self._get(ev.get("champion"), name)}
        return figures

    @staticmethod
    def _get(scores: dict | None, name: str):
        return scores.get(name) if scores else None

    def report_metrics(self, s: dict, ev: dict) -> list[str]:
        """The summary page's metrics: reference metrics by model, the judge's verdicts."""
        return _report_metrics(self, s, ev)

    def report_data(self, s: dict, stages: dict[str, dict]) -> list[str]:
        """The curated answers' lengths against the spec's target."""
        return _report_data(self, s)

    # ── curation and preference pairs ───────────────────────────────────────────────────
    def curate(self, kept: list[dict]) -> tuple[list[dict], dict]:
        return kept, {}

    def pair_writer(self, runtime, sft_dir: Path, items: list[dict]) -> TextPairWriter:
        return TextPairWriter(self, runtime, sft_dir, items)


class TextPairWriter:
    """DPO pairs for text answers: the SFT model writes its own answer for every curated
    prompt (one batched pass, here); per batch the pairwise judge compares the curated answer
    with it in both orders, and a pair is kept only where the curated answer wins both."""

    def __init__(self, kind: TextKind, runtime, sft_dir: Path, items: list[dict]):
        self.kind = kind
        self.gateway = runtime.gateways["judge"]
        texts = generate_texts(str(sft_dir), [i["prompt"] for i in items],
                               max_new_tokens=kind.spec.evaluation.max_new_tokens)
        self.own = {str(i["row_id"]): kind.parse(t) for i, t in zip(items, texts, strict=True)}

    def write(self, batch: list[dict], agent: str, slice_id: str | None = None) -> PairsResult:
        result = PairsResult()
        curated = [self._answer(i["completion"]) for i in batch]
        own = [self.own[str(i["row_id"])] for i in batch]
        judge = self.kind.pairwise_judge(self.gateway, self.kind.spec.llm.judge)  # per batch:
        try:                                                   # batches run on threads
            verdicts = judge.compare(curated, own, batch, agent=agent)
        except ProviderError as e:
            result.calls, result.failed_calls = 1, 1
            result.rejected[f"llm_error: {e.kind}"] += len(batch)
            return result
        result.calls = judge.calls
        for item, verdict, mine in zip(batch, verdicts["per_row"], own, strict=True):
            if verdict["outcome"] == "win":
                result.pairs.append(Pair(item["row_id"], item["prompt"], item["completion"],
                                         self.kind.completion(_text(mine))))
            else:
                result.rejected[NOT_PREFERRED] += 1
        return result

    def _answer(self, completion: str):
        """The curated answer back out of its completion (the template's text around it)."""
        return self.kind.parse(completion)


def _text(value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                           sort_keys=True)


def _cell(value, limit: int = 70) -> str:
    """An answer in one table cell: one line, at most `limit` characters, no pipes."""
    text = " ".join(_text(value).split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _verdict_figures(v: dict) -> dict:
    return {k: v[k] for k in ("win_rate", "lower", "upper", "wins", "losses", "ties", "n",
                              "position_consistency") if k in v}


# ── the run's pages ─────────────────────────────────────────────────────────────────────────
def _win(v: dict | None) -> str:
    if not v:
        return "—"
    return (f"{num(v.get('win_rate'))} (lower {num(v.get('lower'))}; {v.get('wins')}-"
            f"{v.get('losses')}, {v.get('ties')} ties)")


def _report_metrics(kind: TextKind, s: dict, ev: dict) -> list[str]:
    """The summary page's metrics: reference metrics by model, and the judge's verdicts."""
    names = [n for n in kind.references if s.get(n) is not None]
    rows = []
    for label, key in (("base (untrained)", "base"), ("after SFT", "sft"),
                       ("**final**" + (" (SFT + DPO)" if s.get("dpo_reward_accuracy") is not None
                                       else ""), "final"),
                       (f"champion v{s.get('previous_champion_version')} (same rows)",
                        "champion")):
        scores = ev.get(key) or {}
        if key == "champion" and not scores:
            continue
        rows.append([label, *(num(scores.get(n)) for n in names), num(scores.get("valid_share"))])
    lines = table(["model", *names, "answers keeping the rules"], rows)
    lines += ["", ("Judge, final model against the other (each row in both orders, ties apart; "
              "95% Wilson bounds):"), ""]
    lines += table(["against", "win-rate"], [["base model", _win(s.get("win_rate_vs_base"))],
                                             ["champion", _win(s.get("win_rate_vs_champion"))]],
                   align="ll")
    return lines


def _report_data(kind: TextKind, s: dict) -> list[str]:
    """The curated answers' length distribution against the spec's target."""
    lengths = s.get("answer_lengths") or {}
    lines = ["", "## Answers", ""]
    if not lengths:
        return lines + ["No answer lengths measured."]
    target = lengths.get("target") or (kind.task.rules.target_words if kind.task.rules else None)
    lines.append(f"{lengths.get('n')} curated answers: {num(lengths.get('mean_words'), 1)} words "
                 f"on average (median {lengths.get('median_words')}, 10th-90th percentile "
                 f"{lengths.get('p10')}-{lengths.get('p90')})"
                 + (f"; {num(lengths.get('share_in_target'))} within the target of "
                    f"{target[0]}-{target[1]} words" if lengths.get("share_in_target")
                    is not None and target else "")
                 + f"; {s.get('near_duplicates_dropped', 0)} near-duplicate answers dropped.")
    histogram = lengths.get("histogram") or []
    if histogram:
        lines += ["", *table(["words", "answers"], [[f"{b['low']}-{b['high']}", b["count"]]
                                                     for b in histogram])]
    return lines


def verdicts_by_slice(per_row: list[dict], groups: list[str]) -> dict[str, dict]:
    """The judge's pairwise verdicts by slice group: {group: {n, wins, losses, ties, net}},
    net = (wins - losses) / n, so a slice where the new model loses to the champion shows
    a negative net however well it does elsewhere."""
    out: dict[str, dict] = {}
    for verdict, group in zip(per_row, groups, strict=True):
        g = out.setdefault(group, {"n": 0, "wins": 0, "losses": 0, "ties": 0})
        g["n"] += 1
        g[{"win": "wins", "loss": "losses"}.get(verdict["outcome"], "ties")] += 1
    for g in out.values():
        g["net"] = (g["wins"] - g["losses"]) / g["n"]
    return dict(sorted(out.items()))
