"""Run `preftune ARGS...` and SIGKILL it at one named point, so a test kills a run exactly there
(inside a checkpoint save, between two steps) instead of racing it by watching files.

    python tests/reliability/kill_at.py POINT STEP train CONFIG [--resume]

POINT, for the checkpoint of step STEP (or, for after-step, the step STEP itself):
  reference-half   reference/ holds its config and half of model.safetensors: a kill while the
                   moved reference (model.reference_sync) is being written
  before-manifest  the checkpoint's temporary folder is whole, reference/ too, but not closed
  before-rename    the manifest is written and synced; the folder is not renamed into place yet
  after-rename     the checkpoint is in place; the run has not gone on
  after-step       step STEP's metrics line is written; the next step has not begun

A run that ends without reaching its point exits as usual (0), which the test sees.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, target: int) -> None:
    from preftune import checkpoint, dist_checkpoint, loggers

    def is_target(folder: Path) -> bool:  # step-N.tmp while it is written (step-N for a writer in place)
        return Path(folder).name.startswith(f"step-{target:06d}")

    if point == "reference-half":
        write_weights = dist_checkpoint.write_weights

        def half_written(model, folder, state):
            write_weights(model, folder, state)
            if folder.name == dist_checkpoint.REFERENCE_DIR and is_target(folder.parent):
                weights = folder / "model.safetensors"
                os.truncate(weights, weights.stat().st_size // 2)
                die()

        dist_checkpoint.write_weights = half_written
    elif point == "before-manifest":
        write_manifest = checkpoint.write_manifest

        def unclosed(folder, step):
            if is_target(folder):
                die()
            write_manifest(folder, step)

        checkpoint.write_manifest = unclosed
    elif point == "before-rename":
        fsync_tree = checkpoint._fsync_tree

        def synced_not_renamed(folder):
            fsync_tree(folder)
            if is_target(folder):
                die()

        checkpoint._fsync_tree = synced_not_renamed
    elif point == "after-rename":
        save = dist_checkpoint.save_training_checkpoint

        def saved(folder, step, *args, **kwargs):
            written = save(folder, step, *args, **kwargs)
            if step == target:
                die()
            return written

        dist_checkpoint.save_training_checkpoint = saved
    elif point == "after-step":
        log = loggers.MetricsLogger.log

        def logged(self, metrics, step):
            log(self, metrics, step)
            if step == target and "loss" in metrics:  # the training line, not an eval/ one
                die()

        loggers.MetricsLogger.log = logged
    else:
        raise SystemExit(f"kill_at.py: unknown point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    sys.argv = ["preftune", *sys.argv[3:]]
    from preftune.cli import main

    main()
