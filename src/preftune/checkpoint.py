"""Checkpoints that survive kills and full disks, and resume to the same weights.

A checkpoint is a folder `OUTPUT/checkpoints/step-000100/` holding the policy (safetensors,
loadable by `from_pretrained`), the tokenizer, and `training_state.pt` (optimizer, scheduler,
step, data position, RNG states). It is written into a temporary folder, closed with a
`manifest.json` of SHA-256 checksums, and renamed into place: a folder with a valid manifest is
complete, anything else is the trace of an interrupted save and is never resumed from.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from preftune.errors import UserError
from preftune.records import is_full_disk

MANIFEST = "manifest.json"
STATE_FILE = "training_state.pt"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, step: int) -> None:
    files = {str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def is_complete(folder: Path) -> bool:
    """True when every file listed in the manifest exists with its checksum."""
    return checkpoint_damage(folder) is None


def checkpoint_damage(folder: Path) -> str | None:
    """What keeps `folder` from being a complete checkpoint, naming the file or folder (a
    reference/ deleted or truncated by hand, say), so a user knows what was lost; None if nothing."""
    folder = Path(folder)  # a str would fail inside the try and read as "incomplete"
    try:
        files = dict(json.loads((folder / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # any damage at all
        return f"{folder / MANIFEST} is missing or unreadable"
    for name, digest in files.items():
        path = folder / name
        if not path.parent.is_dir():  # a whole folder gone: name it rather than its first file
            return f"the folder {path.parent} is missing"
        try:
            if _sha256(path) != digest:
                return f"{path} is truncated or changed (its SHA-256 is not the manifest's)"
        except OSError:
            return f"{path} is missing or unreadable"
    return None


def save_checkpoint(folder: Path, step: int, save_model, training_state: dict) -> Path:
    """Write a checkpoint atomically. `save_model(path)` writes the weights and tokenizer."""
    def fill(tmp: Path) -> None:
        save_model(tmp)
        torch.save(training_state, tmp / STATE_FILE)
        write_manifest(tmp, step)

    return write_folder_atomically(folder, fill, "the checkpoint")


def write_folder_atomically(folder: Path, fill, what: str,
                            then: str = "the earlier checkpoints are intact; free some space and resume "
                                        "with --resume") -> Path:
    """`fill(tmp)` writes the contents into a temporary folder beside `folder`, which is then
    fsynced and renamed into place, so a kill leaves the old folder or the new one, never half
    of one. A full disk is a UserError naming `what`, then saying `then` (what is intact and
    what to do), with the temporary folder removed."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    # An earlier folder is renamed aside and deleted only once the new one is in place: deleted
    # in place, a kill during the deletion left half of it (an export that its rerun refused).
    # ".tmp-old", not ".old": a name preftune's own, unlike a backup a user may keep beside it.
    old = folder.with_name(folder.name + ".tmp-old")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)  # what a kill left behind
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        _fsync_tree(tmp)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)  # the rename itself must reach the disk
    except Exception as e:
        full = _out_of_space(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written folder only takes space
        if full:
            raise UserError(f"out of disk space while saving {what} {folder}; {then}.") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder


# Full disks surface differently per writer: Python's open() raises OSError(ENOSPC); safetensors
# raises SafetensorError("... No space left on device (os error 28)"); torch.save raises a
# RuntimeError ("unexpected pos ...") that has lost the errno, so free space decides that one.
_FULL_DISK_WORDS = ("no space left on device", "os error 28", "disk quota exceeded", "storagefull")
_NEARLY_FULL_BYTES = 64 << 20


def _out_of_space(error: BaseException, folder: Path) -> bool:
    if is_full_disk(error):
        return True
    if any(word in str(error).lower() for word in _FULL_DISK_WORDS):
        return True
    try:
        return shutil.disk_usage(folder.parent).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    # Only step-<digits>: leaves out .tmp folders of interrupted saves and a user's own copies.
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name)]
    return sorted(found, key=_step_of)


def latest_good_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint; broken newer ones are reported and passed over."""
    for folder in reversed(list_checkpoints(output_dir)):
        damage = checkpoint_damage(folder)
        if damage is None:
            return folder
        warnings.warn(f"checkpoint {folder} is incomplete or corrupt ({damage}); using an earlier one.",
                      stacklevel=2)
    return None


def prune_checkpoints(output_dir: Path, keep: int | None, current_step: int | None = None) -> None:
    """Keep the `keep` newest checkpoints at or before `current_step` (the one just saved).

    Checkpoints after `current_step` belong to an abandoned timeline: a broken one that resume
    passed over, or later ones of a run resumed from an earlier point. Keeping them by name
    would delete good checkpoints and keep a corrupt one, so they go first.
    """
    if keep is None:
        return
    folders = list_checkpoints(output_dir)
    if current_step is not None:
        stale = [f for f in folders if _step_of(f) > current_step]
        folders = [f for f in folders if _step_of(f) <= current_step]
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)
    for folder in folders[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)


def _step_of(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load safetensors weights from a checkpoint into an already-built model, in place."""
    if hasattr(model, "peft_config"):  # a LoRA run's checkpoint holds the adapter only
        from preftune.lora import load_adapter_weights

        return load_adapter_weights(model, folder)
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserError(f"checkpoint {folder} holds no .safetensors weights.")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained writes a tied weight once; its twin is filled by the tie.
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - \
        {name for name, _ in model.named_parameters()}
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise UserError(f"checkpoint {folder} does not match the model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}.")


def load_training_state(folder: Path, mmap: bool = False) -> dict:
    """`mmap`: tensors are mapped, not read, for a caller that wants only the small entries."""
    # Our own file, holding optimizer state and RNG tuples: not loadable with weights_only.
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False, mmap=mmap)


# What a run leaves in train.output_dir: train's records, the report, the logger backends'
# folders, and what `preftune eval` and `export` write from its policies. A new run in the same
# folder would mix with them. Not listed: config.yaml, which every run rewrites, and the
# reference log-prob cache (reference_logps/), keyed by content and so still valid for a new run.
# Glob patterns: `preftune export` writes merged/ for final/ and merged-step-N/ for a checkpoint
# (adapter/ and adapter-step-N/ without --merge).
RUN_ENTRIES = ("metrics.jsonl", "checkpoints", "final", "final.tmp", "report.html", "plots",
               "tensorboard", "wandb", "merged", "merged-step-*", "adapter", "adapter-step-*",
               "leaderboard.json", "leaderboard.md")


def earlier_run_entries(output_dir: Path) -> list[str]:
    """The names matching RUN_ENTRIES in `output_dir`: empty when no run was there."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return [path.name for pattern in RUN_ENTRIES for path in sorted(output_dir.glob(pattern))]


def remove_earlier_run(output_dir: Path) -> tuple[list[str], list[str]]:
    """Delete an earlier run's entries (RUN_ENTRIES) from `output_dir`, for a run that starts
    over there; returns (removed, left): the names deleted and the other names still there."""
    output_dir = Path(output_dir)
    removed = earlier_run_entries(output_dir)
    for name in removed:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    left = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    return removed, left


def resolve_resume(resume: str | bool | None, output_dir: Path) -> Path | None:
    """`--resume` alone means the newest good checkpoint of this run; a path means that one."""
    if not resume:
        return None
    if resume is True or resume == "latest":
        found = latest_good_checkpoint(output_dir)
        if found is None and not earlier_run_entries(output_dir):
            # A first start given --resume (a script's habit, or a typo in train.output_dir).
            raise UserError(f"--resume: {output_dir} holds no run to resume; check train.output_dir, or "
                            "leave --resume out to start a run there.")
        if found is None:
            # A run killed before its first checkpoint: nothing to resume, but its metrics make
            # a plain start refuse the folder, so say the way out.
            raise UserError(f"--resume: no complete checkpoint under {output_dir}/checkpoints, so the run "
                            "there cannot be resumed; start it again with --overwrite instead of --resume.")
        return found
    folder = Path(resume)
    if not folder.is_dir():  # a typo, most often: "restore the folder" would send the user astray
        raise UserError(f"--resume-from {folder}: no such folder; name a checkpoint folder "
                        "(checkpoints/step-N of the run), or use --resume to take the newest complete one.")
    # A run folder or its checkpoints/ is a slip for one checkpoint, not a damaged one to restore.
    run = folder if (folder / "checkpoints").is_dir() else folder.parent if folder.name == "checkpoints" else None
    if run is not None and not (folder / MANIFEST).exists():
        what = "a run folder" if run == folder else "a run's checkpoints folder"
        newest = latest_good_checkpoint(run)
        raise UserError(f"--resume-from {folder} is {what}, not a checkpoint; "
                        + (f"name one of its checkpoints, e.g. --resume-from {newest}." if newest else
                           "it holds no complete checkpoint to resume from."))
    # final/ or merged/: a model, without the manifest and training state of a checkpoint.
    if (folder / "config.json").is_file() and not any((folder / name).exists() for name in (MANIFEST, STATE_FILE)):
        raise UserError(f"--resume-from {folder} is a model folder, not a checkpoint: it holds no optimizer state "
                        f"or data position; to train on from it, start a new run with model.path: {folder} "
                        "in another train.output_dir.")
    damage = checkpoint_damage(folder)
    if damage is not None:
        raise UserError(f"--resume-from {folder}: not a complete checkpoint ({damage}); restore the folder "
                        "from a good copy, or resume from an earlier checkpoint (--resume alone takes "
                        "the newest complete one).")
    return folder
