"""Checkpoints: a corrupt or partial latest one is passed over at --resume with a warning,
`train.keep_checkpoints` keeps K, and a full disk mid-save is a clear error that leaves the
previous checkpoint intact (and the run resumable to the same weights)."""

from __future__ import annotations

import errno
import warnings

import pytest
import torch
from reliability_helpers import assert_bit_identical, checkpoint_dir, run_config, weights
from safetensors import SafetensorError

from preftune import checkpoint
from preftune.checkpoint import (
    is_complete,
    latest_good_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    save_checkpoint,
)
from preftune.config import validate_config
from preftune.errors import UserError
from preftune.train import train


def write_fake_checkpoint(output_dir, step: int, payload: bytes = b"weights" * 100):
    def save_model(path):
        (path / "model.safetensors").write_bytes(payload)
        (path / "tokenizer.json").write_text("{}")

    return save_checkpoint(checkpoint_dir(output_dir, step), step, save_model, {"step": step})


def flip_a_byte(path, offset: int = 50):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------ detection


@pytest.mark.parametrize("damage", ["flipped byte", "manifest missing", "file missing", "file truncated",
                                    "manifest garbage"])
def test_a_broken_latest_checkpoint_is_passed_over_with_a_warning(tmp_path, damage):
    for step in (1, 2, 3):
        write_fake_checkpoint(tmp_path, step)
    latest = checkpoint_dir(tmp_path, 3)
    weights_file = latest / "model.safetensors"
    if damage == "flipped byte":
        flip_a_byte(weights_file)
    elif damage == "manifest missing":
        (latest / "manifest.json").unlink()
    elif damage == "file missing":
        weights_file.unlink()
    elif damage == "file truncated":
        weights_file.write_bytes(weights_file.read_bytes()[:10])
    else:
        (latest / "manifest.json").write_text('{"files": ["model.safetensors"]}')
    (tmp_path / "checkpoints" / "step-000004.tmp").mkdir()  # an interrupted save, never a candidate
    with pytest.warns(UserWarning, match="step-000003 is incomplete or corrupt"):
        assert latest_good_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)


def test_no_complete_checkpoint_at_resume_is_a_user_error(tmp_path):
    write_fake_checkpoint(tmp_path, 1)
    flip_a_byte(checkpoint_dir(tmp_path, 1) / "model.safetensors")
    with warnings.catch_warnings(), pytest.raises(UserError, match="no complete checkpoint .* with --overwrite"):
        warnings.simplefilter("ignore")
        checkpoint.resolve_resume(True, tmp_path)


@pytest.mark.parametrize("made", [False, True])
def test_resume_where_no_run_is_says_so_rather_than_to_overwrite(tmp_path, made):
    # A first start given --resume, or a typo in train.output_dir: there is nothing to overwrite.
    output_dir = tmp_path / "run"
    if made:
        output_dir.mkdir()
    with pytest.raises(UserError) as caught:
        checkpoint.resolve_resume(True, output_dir)
    assert str(caught.value) == (f"--resume: {output_dir} holds no run to resume; check train.output_dir, or "
                                 "leave --resume out to start a run there.")


def test_resume_from_a_folder_that_does_not_exist_says_so_rather_than_to_restore_it(tmp_path):
    """A mistyped --resume-from is the usual case: the sentence must name the missing folder and
    not send the user to restore a checkpoint that never was."""
    typo = tmp_path / "checkpoints" / "step-00004"
    with pytest.raises(UserError) as caught:
        checkpoint.resolve_resume(str(typo), tmp_path)
    message = str(caught.value)
    assert message.startswith(f"--resume-from {typo}: no such folder;"), message
    assert "restore" not in message and message.count(". ") == 0 and message.endswith(".")


def test_resume_from_a_run_its_checkpoints_or_its_final_policy_says_which_it_is(tmp_path):
    """All three were 'not a complete checkpoint (manifest.json is missing); restore the folder
    from a good copy': sent to restore what was never damaged."""
    run = tmp_path / "run"
    write_fake_checkpoint(run, 2)
    newest = write_fake_checkpoint(run, 4)
    for given, what in ((run, "a run folder"), (run / "checkpoints", "a run's checkpoints folder")):
        with pytest.raises(UserError) as caught:
            checkpoint.resolve_resume(str(given), run)
        assert str(caught.value) == (f"--resume-from {given} is {what}, not a checkpoint; name one of its "
                                     f"checkpoints, e.g. --resume-from {newest}.")
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    with pytest.raises(UserError) as caught:
        checkpoint.resolve_resume(str(run / "final"), run)
    assert str(caught.value) == (f"--resume-from {run / 'final'} is a model folder, not a checkpoint: it holds no "
                                 f"optimizer state or data position; to train on from it, start a new run with "
                                 f"model.path: {run / 'final'} in another train.output_dir.")
    (newest / "manifest.json").unlink()  # a damaged checkpoint is still told to restore it
    (newest / "config.json").write_text("{}")  # as a real checkpoint holds, beside its training state
    with pytest.raises(UserError, match="not a complete checkpoint .* restore the folder"):
        checkpoint.resolve_resume(str(newest), run)


def test_resume_passes_over_corrupt_and_partial_checkpoints_and_still_ends_bit_identical(
        tmp_path, dropout_model, pairs_path, uninterrupted, capsys):
    """Checkpoints every 3 steps; step 12's weights get a flipped byte, step 9 loses its
    manifest; --resume must warn, use step 6, and finish with the uninterrupted weights."""
    raw = run_config(dropout_model, pairs_path, tmp_path / "run", train={"save_every": 3})
    assert_bit_identical(weights(train(validate_config(raw))), uninterrupted)
    flip_a_byte(checkpoint_dir(tmp_path / "run", 12) / "model.safetensors", offset=5000)
    (checkpoint_dir(tmp_path / "run", 9) / "manifest.json").unlink()
    with pytest.warns(UserWarning, match="incomplete or corrupt") as caught:
        final = train(validate_config(raw), resume=True)
    passed_over = {str(w.message).split()[1].rsplit("/", 1)[-1] for w in caught
                   if "incomplete or corrupt" in str(w.message)}
    assert passed_over == {"step-000012", "step-000009"}
    out = "".join(capsys.readouterr().out.split())  # rich wraps long lines anywhere
    assert "".join(f"resumed from {checkpoint_dir(tmp_path / 'run', 6)}".split()) in out
    assert_bit_identical(weights(final), uninterrupted)
    assert all(is_complete(f) for f in list_checkpoints(tmp_path / "run"))  # rewritten whole


# ------------------------------------------------------------------------------ keep_checkpoints


def test_keep_checkpoints_keeps_the_newest_k(tmp_path, dropout_model, pairs_path):
    raw = run_config(dropout_model, pairs_path, tmp_path / "run", train={"keep_checkpoints": 2})
    train(validate_config(raw))
    assert [f.name for f in list_checkpoints(tmp_path / "run")] == ["step-000011", "step-000012"]


def test_pruning_drops_a_stale_broken_checkpoint_rather_than_good_ones(tmp_path):
    """Resumed from step 2 because step 4 was corrupt, the run saves step 3: keeping the two
    newest by name would keep the corrupt step 4 and delete good ones."""
    for step in (1, 2, 3, 4):
        write_fake_checkpoint(tmp_path, step)
    flip_a_byte(checkpoint_dir(tmp_path, 4) / "model.safetensors")
    prune_checkpoints(tmp_path, keep=2, current_step=3)
    assert [f.name for f in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]


# ------------------------------------------------------------------------------ full disk


def fail_like(kind: str):
    """The exception each writer raises on a full disk (checked on a 300 KiB tmpfs)."""
    if kind == "python open":
        return OSError(errno.ENOSPC, "No space left on device")
    if kind == "safetensors":
        return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


@pytest.mark.parametrize("kind", ["python open", "safetensors", "torch.save"])
def test_a_full_disk_mid_save_is_a_user_error_and_the_previous_checkpoint_survives(tmp_path, monkeypatch,
                                                                                    kind):
    write_fake_checkpoint(tmp_path, 1)
    if kind == "torch.save":  # this one lost its errno: free space tells
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: type("U", (), {"free": 4096})())

    def half_written_then_full(path):
        (path / "model.safetensors").write_bytes(b"half")
        raise fail_like(kind)

    with pytest.raises(UserError, match="out of disk space .* earlier checkpoints are intact"):
        save_checkpoint(checkpoint_dir(tmp_path, 2), 2, half_written_then_full, {"step": 2})
    assert [f.name for f in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]  # no .tmp left
    assert is_complete(checkpoint_dir(tmp_path, 1))


def test_other_save_failures_are_not_called_a_full_disk(tmp_path):
    def broken(path):
        raise RuntimeError("some bug")

    with pytest.raises(RuntimeError, match="some bug"):
        save_checkpoint(checkpoint_dir(tmp_path, 1), 1, broken, {})
    assert not (tmp_path / "checkpoints" / "step-000001.tmp").exists()


def test_disk_full_during_training_stops_cleanly_and_the_run_resumes_bit_identical(
        tmp_path, dropout_model, pairs_path, uninterrupted, monkeypatch):
    raw = run_config(dropout_model, pairs_path, tmp_path / "run", train={"save_every": 4})
    real_save = torch.save

    def full_at_step_8(obj, path, *args, **kwargs):
        if "step-000008" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_at_step_8)
    with pytest.raises(UserError, match="out of disk space"):
        train(validate_config(raw))
    run = tmp_path / "run"
    assert [f.name for f in (run / "checkpoints").iterdir()] == ["step-000004"]
    assert is_complete(checkpoint_dir(run, 4))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)  # space freed
    assert_bit_identical(weights(train(validate_config(raw), resume=True)), uninterrupted)


def test_disk_full_while_writing_the_final_policy_leaves_no_half_folder(tmp_path, dropout_model, pairs_path,
                                                                       uninterrupted, monkeypatch):
    from preftune import dist_checkpoint

    raw = run_config(dropout_model, pairs_path, tmp_path / "run", train={"save_every": 6})
    real_write = dist_checkpoint.write_weights

    def full_disk_at_the_end(policy, folder, state):
        real_write(policy, folder, state)  # the weights land, then the disk fills up
        if folder.name == "final.tmp":
            raise fail_like("safetensors")

    monkeypatch.setattr(dist_checkpoint, "write_weights", full_disk_at_the_end)
    with pytest.raises(UserError, match="out of disk space while saving the final policy"):
        train(validate_config(raw))
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "final" in p.name) == []
    monkeypatch.setattr(dist_checkpoint, "write_weights", real_write)
    assert_bit_identical(weights(train(validate_config(raw), resume=True)), uninterrupted)
