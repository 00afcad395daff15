"""Training progress: steps, loss, reward accuracy, throughput, time left.

On an interactive terminal a live bar. Anywhere else (output piped to a log file, a CI job, a
batch scheduler) a bar cannot redraw, so it would show nothing until the run ends; instead a
plain line is printed at the first step, then at most every `every_s` seconds, and at the last.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LINE_EVERY_S = 30.0


def interactive_terminal() -> bool:
    """True when a live bar can redraw in place: stdout is a terminal (or a Jupyter notebook,
    where rich draws it as a widget) and not a CI job's log."""
    console = Console()
    return (console.is_interactive or console.is_jupyter) and not os.environ.get("CI")


def _tokens(per_second: float) -> str:
    return f"{per_second / 1000:.1f}k tok/s" if per_second >= 1000 else f"{per_second:.0f} tok/s"


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class TrainProgress:
    """total_steps: the run's length; start_step: where a resumed run starts.
    interactive: a live bar (True) or plain lines (False); by default, a bar on a terminal."""

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True,
                 interactive: bool | None = None, every_s: float = LINE_EVERY_S):
        self.enabled = enabled
        self.total, self.start_step = total_steps, start_step
        self.interactive = interactive_terminal() if interactive is None else interactive
        self.every_s = every_s
        self._started = self._last_line = None
        self._last_line_step = start_step
        self._rates: list[float] = []  # tokens/s of the steps since the last plain line
        self._progress = None
        if enabled and self.interactive:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("left"),
                TimeRemainingColumn(),
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step,
                                                 stats="")

    def update(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        stats = f"loss {metrics['loss']:.4f} acc {metrics['rewards/accuracies']:.2f}"
        rate = metrics.get("tokens_per_second")
        if self._progress is not None:
            if rate is not None:
                stats += f" {_tokens(rate)}"
            self._progress.update(self._task, completed=step, stats=stats)
            return
        if rate is not None:
            self._rates.append(rate)
        now = time.monotonic()
        due = (self._last_line is None or now - self._last_line >= self.every_s
               or step >= self.total)
        if due:
            self._print_line(step, stats, now)
            self._last_line, self._last_line_step, self._rates = now, step, []

    def _print_line(self, step: int, stats: str, now: float) -> None:
        parts = [f"train: step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)",
                 stats.replace(" acc", ", acc")]
        if self._rates:
            parts.append(_tokens(sum(self._rates) / len(self._rates)))
        elapsed = now - (self._started if self._started is not None else now)
        parts.append(f"{_clock(elapsed)} elapsed")
        # The pace since the previous line (since the start for the first), so that a slow first
        # step (compilation, caches) stops weighing on the estimate once the run is under way.
        since = self._last_line if self._last_line is not None else self._started
        window, done = (now - since if since is not None else 0.0), step - self._last_line_step
        if 0 < step < self.total and done > 0 and window > 0:
            parts.append(f"about {_clock((self.total - step) * window / done)} left")
        print(", ".join(parts), file=sys.stdout, flush=True)

    def __enter__(self):
        self._started = time.monotonic()
        if self._progress is not None:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
