"""The training progress bar: steps, loss, reward accuracy, time left."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("left"),
            TimeRemainingColumn(), disable=not enabled,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, stats="")

    def update(self, step: int, metrics: dict) -> None:
        stats = f"loss {metrics['loss']:.4f} acc {metrics['rewards/accuracies']:.2f}"
        self._progress.update(self._task, completed=step, stats=stats)

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        self._progress.__exit__(*exc)
