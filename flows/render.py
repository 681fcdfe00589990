"""Render a warehouse row into a training prompt, and a label into its completion.

The one place the spec's `task.prompt_template` / `task.completion_template` (Python
`str.format` strings, so `{body:.300}` truncates) are applied: the submit tool, curation and
evaluation all call these, so a prompt is rendered the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping

from flows.spec import Spec


class RenderError(ValueError):
    """A template that cannot be rendered for this row or label."""


def render_prompt(spec: Spec, row: Mapping) -> str:
    """The training prompt for one row (a mapping of column -> value).

    A NULL column renders as an empty string, so `{body:.300}` never fails on a missing body."""
    template = spec.task.prompt_template
    values = {col: ("" if row.get(col) is None else row[col]) for col in spec.task.template_columns()}
    try:
        return template.format(**values)
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise RenderError(f"task.prompt_template: cannot render for this row ({e})") from None


def render_completion(spec: Spec, label: str) -> str:
    """The training completion for a label, e.g. ' tech' for the template ' {label}'."""
    try:
        return spec.task.completion_template.format(label=label, answer=label)
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise RenderError(f"task.completion_template: cannot render label {label!r} ({e})") from None
