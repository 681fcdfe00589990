"""Task kinds: what differs between a classification task and the others, behind one small
interface (`TaskKind`, flows/kinds/base.py), one module per kind.

    kind = kind_of(spec)
    gate = Gate(kind.answer_rule(), ...)        # the answer's format and the gate's rules
    completion = kind.completion(answer)        # what the model is trained to write
    scores = kind.score(model_dir, rows)        # one model on the held-out rows
    verdict = kind.decide(ev)                   # the spec's promotion rule on those scores

The flow and its stages call only this; they do not branch on `task.kind`.
"""

from __future__ import annotations

from flows.kinds.base import TaskKind
from flows.kinds.classification import Classification
from flows.kinds.extraction import Extraction
from flows.kinds.generation import Generation
from flows.spec import Spec

KINDS: dict[str, type] = {"classification": Classification, "generation": Generation,
                          "extraction": Extraction}

__all__ = ["KINDS", "TaskKind", "kind_of"]


def kind_of(spec: Spec) -> TaskKind:
    """The spec's task kind (`task.kind`), ready to use."""
    return KINDS[spec.task.kind](spec)
