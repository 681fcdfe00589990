"""What every section of the spec shares: strict models, and errors that name their field.

Unknown keys are errors (`extra="forbid"`) because a misspelt key silently ignored is how
spec drift starts; `FieldError` is how a cross-field check names the field path it is about.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class FieldError(ValueError):
    """A cross-field problem that names its own field path."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message
