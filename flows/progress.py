"""Progress on screen for long stages (rich), shared by the flow and its task threads.

Tasks run in threads of the flow's process and receive only a progress id (a string, so
Prefect state stays small); `Progress.get(id)` finds the live bars. When no progress was
created (a task run alone, a deployment without a terminal), every call is a no-op.

`StageClock` times the flow's stages for the summary and shows a bar for those that have
one:

    stage = StageClock(progress)
    with stage("train", "training (TRL SFT via accelerate)", total=max_steps):
        ...
    stage.seconds  # {"train": 12.3, ...}
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

_LIVE: dict[str, Progress] = {}
_PROGRESS = "[progress] "  # training/sft.py prints `[progress] {"step": ..., "loss": ...}`


class Progress:
    def __init__(self, enabled: bool = True):
        self.id = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._bars: dict[str, int] = {}
        self._rich = (
            RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
                console=Console(stderr=True), transient=False,
            )
            if enabled else None
        )

    @classmethod
    def create(cls) -> Progress:
        p = cls()
        _LIVE[p.id] = p
        return p

    @classmethod
    def get(cls, progress_id: str | None) -> Progress:
        return _LIVE.get(progress_id or "") or cls(enabled=False)

    def start(self, key: str, description: str, total: int) -> None:
        if not self._rich:
            return
        with self._lock:
            if not self._bars:
                self._rich.start()
            self._bars[key] = self._rich.add_task(description, total=total, note="")

    def advance(self, key: str, n: int = 1, note: str | None = None) -> None:
        if self._rich and key in self._bars:
            with self._lock:
                fields = {"note": note} if note is not None else {}
                self._rich.update(self._bars[key], advance=n, **fields)

    def stop(self, key: str) -> None:
        if self._rich and key in self._bars:
            with self._lock:
                self._rich.stop_task(self._bars.pop(key))
                if not self._bars:
                    self._rich.stop()

    def training_line(self, line: str) -> None:
        """Feed one line of the training log; a `[progress] {json}` line moves the bar."""
        if not (self._rich and "train" in self._bars and line.startswith(_PROGRESS)):
            return
        try:
            event = json.loads(line[len(_PROGRESS):])
        except json.JSONDecodeError:
            return
        note = f"loss {event['loss']:.3f}" if isinstance(event.get("loss"), float) else None
        with self._lock:
            self._rich.update(self._bars["train"], completed=int(event.get("step", 0)),
                              **({"note": note} if note else {}))


class StageClock:
    """Wall seconds per stage of the flow, in the order the stages ran."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, bar: str | None = None, total: int = 0,
                 bar_key: str | None = None) -> Iterator[None]:
        """Time stage `name`; with `bar`, show a progress bar of `total` steps under
        `bar_key` (default `name`; training stages share the `train` key their log lines
        move)."""
        key = bar_key or name
        if bar:
            self.progress.start(key, bar, total)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t, 2)
            if bar:
                self.progress.stop(key)
