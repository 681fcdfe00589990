"""Is a DPO run degenerating? One plain function over the Trainer's log history.

    message = dpo_health(history, max_steps)     # None: healthy so far

`history` is the list of the Trainer's training log dicts, each with its `step` (the logs
`DPOTrainer` writes: `loss`, `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
`rewards/accuracies`, ...). The answer is one line naming what went wrong and what to change;
`training.dpo` raises it from a callback so the run stops and the launcher reports the line.

Three failure modes, checked in this order:

1. **not finite**: a NaN or inf loss or reward, at any step.
2. **stuck at ln 2**: the policy is not moving away from the reference. Then every
   reward (beta x log-ratio to the reference) is ~0, so the sigmoid part of the loss,
   -log sigmoid(margin), sits at ln 2 ~ 0.693, and `rewards/accuracies` (chosen reward
   strictly above rejected) stays at or under chance (exact ties count as wrong, so a
   policy identical to its reference scores 0). Judged on the mean of the last WINDOW
   logged points after warm-up: |margin| < STUCK_MARGIN and accuracy <= chance + slack.
3. **margins collapsing**: after the windowed mean margin reached MIN_PEAK_MARGIN, it fell
   to <= 0 or under COLLAPSE_FRACTION of that peak (the policy first separated chosen from
   rejected, then lost it: a learning rate too high, or pairs that contradict each other);
   or it went below -MIN_PEAK_MARGIN (the policy prefers the rejected completions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Logged keys that must stay finite: a NaN here poisons every later step.
FINITE_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
               "rewards/accuracies", "logps/chosen", "logps/rejected")

# No verdict in the first WARMUP_FRACTION of the run (at least MIN_WARMUP_STEPS steps): at
# step 0 the policy IS the reference (margins exactly 0, accuracy 0), and the first steps of a
# healthy run still have margins near 0.
WARMUP_FRACTION = 0.2
MIN_WARMUP_STEPS = 4

# Verdicts use the mean of this many logged points: one logged point averages only
# `logging_steps` batches of a few pairs and is noisy; four are a stable trend.
WINDOW = 4

# |mean margin| under this is "no preference learned": a margin (beta x log-ratio gap) of 1e-4
# keeps the sigmoid loss within 5e-5 of ln 2. Measured here: a frozen policy (lr 1e-12) logs
# margins of exactly 0; the slowest healthy run tried (hidden-32 model, barely trained SFT,
# beta 0.1, lr 1e-4) already had windowed margins of ~2e-3 right after warm-up, 20x above.
STUCK_MARGIN = 1e-4

# Pairwise chance is 0.5 (ties count as wrong, so a frozen policy reads 0); a run whose
# accuracy stays at or under 0.6 over the window has not learned which completion is better.
CHANCE_ACCURACY = 0.5
ACCURACY_SLACK = 0.1

# Collapse: the windowed mean margin reached at least MIN_PEAK_MARGIN (a real separation:
# single logged margins of healthy tiny runs swing by several hundredths step to step), then
# fell under COLLAPSE_FRACTION of that peak (or to <= 0). Healthy margins grow or plateau:
# in three healthy tiny runs here (lr 1e-3 and 3e-3, sigmoid and sigmoid+sft, 40 steps) the
# windowed mean never fell below 0.84 of its running peak; losing three quarters is not noise.
# A windowed mean under -MIN_PEAK_MARGIN is the policy learning the pairs backwards.
MIN_PEAK_MARGIN = 0.05
COLLAPSE_FRACTION = 0.25

LN2 = math.log(2)


def warmup_steps(max_steps: int) -> int:
    return max(MIN_WARMUP_STEPS, math.ceil(WARMUP_FRACTION * max_steps))


def _finite(value) -> bool:
    return not isinstance(value, int | float) or math.isfinite(value)


def dpo_health(history: Sequence[dict], max_steps: int) -> str | None:
    """None while the run looks healthy; else a one-line reason starting 'DPO degenerate:'."""
    for entry in history:
        bad = [k for k in FINITE_KEYS if k in entry and not _finite(entry[k])]
        if bad:
            return (f"DPO degenerate: {', '.join(f'{k}={entry[k]}' for k in bad)} at step "
                    f"{entry.get('step')}: lower dpo.learning_rate (or check the pairs)")

    logged = [e for e in history if "rewards/margins" in e and "rewards/accuracies" in e]
    after = [e for e in logged if e.get("step", 0) >= warmup_steps(max_steps)]
    if len(after) < WINDOW:
        return None
    means = [
        sum(e["rewards/margins"] for e in after[i - WINDOW : i]) / WINDOW
        for i in range(WINDOW, len(after) + 1)
    ]
    window = after[-WINDOW:]
    margin = means[-1]
    accuracy = sum(e["rewards/accuracies"] for e in window) / WINDOW
    steps = f"steps {window[0].get('step')}-{window[-1].get('step')}"

    if abs(margin) < STUCK_MARGIN and accuracy <= CHANCE_ACCURACY + ACCURACY_SLACK:
        return (f"DPO degenerate: sigmoid loss stuck at ln 2 ({LN2:.3f}): rewards/margins {margin:.2g} "
                f"(|m| < {STUCK_MARGIN:g}) and rewards/accuracies {accuracy:.2f} "
                f"(<= {CHANCE_ACCURACY + ACCURACY_SLACK:.2f}) over {steps}: the policy is not "
                f"moving from the reference; raise dpo.learning_rate")
    peak = max(means)
    if peak >= MIN_PEAK_MARGIN and margin < COLLAPSE_FRACTION * peak:
        return (f"DPO degenerate: rewards/margins collapsed to {margin:.3g} over {steps}, "
                f"under {COLLAPSE_FRACTION:.0%} of their peak {peak:.3g}: lower "
                f"dpo.learning_rate or raise dpo.beta")
    if margin <= -MIN_PEAK_MARGIN:
        return (f"DPO degenerate: rewards/margins fell to {margin:.3g} over {steps}: the "
                f"policy prefers the rejected completions; check the pairs (chosen and "
                f"rejected swapped?) or lower dpo.learning_rate")
    return None
