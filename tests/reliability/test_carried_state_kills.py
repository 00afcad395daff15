"""SIGKILLs of runs that carry state across steps, then --resume: TR-DPO's moving reference
(model.reference_sync, saved as reference/ in every checkpoint once a sync has moved it) and
bco_pair's running reward shift.

Each kill is exact: kill_at.py runs `preftune train` and kills its own process at a named point
(inside the save of one checkpoint, or after one step), so no test races the run. After each
kill the newest step-N folder is a complete checkpoint, --resume takes it, and the run resumed
to the end ends with the policy, the reference and the metrics.jsonl of a run never stopped,
bit for bit (as the other tests here: CPU, one thread, train.deterministic). A reference/ deleted
or truncated by hand is refused in one sentence that names it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import pytest
from reliability_helpers import (
    assert_bit_identical,
    checkpoint_dir,
    finish,
    metrics_without_speed,
    resume_to_the_end,
    run_config,
    start_training,
    train_in_process,
    weights,
    write_config,
)

from preftune.checkpoint import is_complete, list_checkpoints
from preftune.errors import UserError


def synced_config(model: Path, data: Path, output_dir: Path, **sections) -> dict:
    """reliability_helpers.run_config with TR-DPO's sync after every second step, so every
    checkpoint from step 2 on holds reference/."""
    raw = run_config(model, data, output_dir, **sections)
    raw["model"]["reference_sync"] = {"every": 2, "alpha": 0.5}
    return raw


def kill_at(config_path: Path, point: str, step: int, log: Path, resume: bool) -> None:
    proc = start_training(config_path, *(["--resume"] if resume else []), log=log, kill_at=(point, step))
    code = finish(proc)
    assert code == -signal.SIGKILL, f"not killed at {point} {step} (exit {code}): {log.read_text()[-2000:]}"


def assert_newest_is_complete(output_dir: Path, step: int) -> None:
    """What --resume will see: the newest step-N folder is `step`, and no step-N folder is half
    a checkpoint (an interrupted save may only leave a .tmp folder, which is never a step-N)."""
    folders = list_checkpoints(output_dir)
    assert folders[-1] == checkpoint_dir(output_dir, step), [f.name for f in folders]
    assert [f.name for f in folders if not is_complete(f)] == []


def said(log: Path, text: str) -> bool:
    return "".join(text.split()) in "".join(log.read_text().split())  # rich wraps long lines anywhere


# (point, the checkpoint whose save it kills, the newest complete checkpoint after the kill)
KILLS_IN_SAVES = [
    ("reference-half", 3, 2),  # reference/model.safetensors half written
    ("before-manifest", 5, 4),  # reference/ whole, the folder not closed
    ("before-rename", 7, 6),  # closed and synced, not visible
    ("after-rename", 9, 9),  # visible, the run not gone on
]


@pytest.mark.slow
def test_sigkills_inside_saves_that_write_the_reference_then_resume_equal_a_run_never_stopped(
        tmp_path, dropout_model, pairs_path):
    whole = tmp_path / "whole"
    train_in_process(synced_config(dropout_model, pairs_path, whole))
    output_dir = tmp_path / "killed"
    config = write_config(tmp_path / "killed.yaml", synced_config(dropout_model, pairs_path, output_dir))
    log = tmp_path / "killed.log"
    resumed_from = None
    for point, step, newest in KILLS_IN_SAVES:
        kill_at(config, point, step, log, resume=resumed_from is not None)
        if resumed_from is not None:
            assert said(log, f"resumed from {checkpoint_dir(output_dir, resumed_from)} at step {resumed_from}")
        assert_newest_is_complete(output_dir, newest)
        assert (checkpoint_dir(output_dir, newest) / "reference" / "model.safetensors").is_file()
        if newest != step:  # the killed save left its trace beside, under a name resume never reads
            assert (checkpoint_dir(output_dir, step).with_name(f"step-{step:06d}.tmp") / "reference").is_dir()
        resumed_from = newest
    resume_to_the_end(config, log)
    assert said(log, f"resumed from {checkpoint_dir(output_dir, 9)} at step 9")
    assert_bit_identical(weights(output_dir / "final"), weights(whole / "final"))
    assert_bit_identical(weights(checkpoint_dir(output_dir, 12) / "reference"),
                         weights(checkpoint_dir(whole, 12) / "reference"))
    assert metrics_without_speed(output_dir) == metrics_without_speed(whole)


@pytest.mark.slow
def test_a_sigkill_between_bco_pair_steps_then_resume_equals_a_run_never_stopped(tmp_path, dropout_model,
                                                                                  pairs_path):
    """Checkpoints every 4 steps, killed after step 6: steps 5 and 6 are redone from step 4's saved
    shift, and every step's logged bco/reward_shift (the delta its loss used), loss and rewards
    are the uninterrupted run's."""
    def config(name: str) -> dict:
        return run_config(dropout_model, pairs_path, tmp_path / name, loss={"type": "bco_pair"},
                          train={"save_every": 4})

    train_in_process(config("whole"))
    output_dir = tmp_path / "killed"
    path = write_config(tmp_path / "killed.yaml", config("killed"))
    log = tmp_path / "killed.log"
    kill_at(path, "after-step", 6, log, resume=False)
    assert_newest_is_complete(output_dir, 4)
    assert [r["step"] for r in metrics_without_speed(output_dir)] == [1, 2, 3, 4, 5, 6]
    resume_to_the_end(path, log)
    assert said(log, f"resumed from {checkpoint_dir(output_dir, 4)} at step 4")
    rows = metrics_without_speed(output_dir)
    assert rows == metrics_without_speed(tmp_path / "whole")
    shifts = [r["bco/reward_shift"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, 13)) and shifts[0] == 0.0
    assert shifts[4] != 0.0  # step 5, the first after the resume, used the shift step 4 saved
    assert_bit_identical(weights(output_dir / "final"), weights(tmp_path / "whole" / "final"))


# ------------------------------------------------------------------------------ damaged by hand


@pytest.mark.parametrize("how, says", [
    ("deleted", "the folder {reference} is missing"),
    ("truncated", "{reference}/model.safetensors is truncated or changed"),
])
def test_a_reference_folder_damaged_by_hand_is_refused_in_one_sentence_naming_it(tmp_path, dropout_model,
                                                                                 pairs_path, how, says):
    """Disk trouble or a bad copy: --resume-from FOLDER refuses the checkpoint in one sentence naming
    its reference/ and what to do; --resume alone warns so and takes the newest complete one."""
    raw = synced_config(dropout_model, pairs_path, tmp_path / "run", train={"save_every": 2, "max_steps": 4})
    uninterrupted = weights(train_in_process(raw))
    damaged = checkpoint_dir(tmp_path / "run", 4)
    reference = damaged / "reference"
    if how == "deleted":
        shutil.rmtree(reference)
    else:
        os.truncate(reference / "model.safetensors", (reference / "model.safetensors").stat().st_size // 2)
    with pytest.raises(UserError) as caught:
        train_in_process(raw, resume=str(damaged))
    message = str(caught.value)
    assert message.startswith(f"--resume-from {damaged}:"), message  # the CLI's option, as typed
    assert says.format(reference=reference) in message, message
    assert "restore the folder from a good copy, or resume from an earlier checkpoint" in message
    assert message.count(". ") == 0 and message.endswith(".")
    with pytest.warns(UserWarning, match=re.escape(f"({says.format(reference=reference)}")):
        train_in_process(raw, resume=True)  # from step 2, whose reference/ the sync at step 2 moved
    assert_bit_identical(weights(tmp_path / "run" / "final"), uninterrupted)
    assert is_complete(damaged)  # written again whole
