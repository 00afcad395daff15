"""Crash-safe JSONL records: append with fsync, read back what a killed run left behind.

Every long job that writes records (sampling, auto-labeling, export, evaluation samples) appends
whole lines and fsyncs each batch, so after a kill the file holds every acknowledged record and
at most one partial last line. `read_records` returns the complete records and, with
`repair=True`, cuts the partial tail off so that appending can resume cleanly.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import Iterable

from preftune.errors import UserError
from preftune.wording import counted


def append_records(path: str | Path, records: Iterable[dict]) -> int:
    """Append `records` as JSON lines, then flush and fsync; returns how many were written."""
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    if not lines:
        return 0
    data = memoryview("".join(lines).encode("utf-8"))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:  # a new file on a disk without room for one more
        if is_full_disk(e):
            raise _no_space_to_append(path) from None
        raise
    try:
        size_before = os.lseek(fd, 0, os.SEEK_END)
        try:
            while data:  # a write to a nearly full disk may take only part of the bytes
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError as e:
            if not is_full_disk(e):
                raise
            # Cut the part of this batch that did fit, so the file ends on a whole record and
            # a rerun (which resumes after the last record) finds what it expects.
            os.ftruncate(fd, size_before)
            raise _no_space_to_append(path) from None
    finally:
        os.close(fd)
    return len(lines)


_FULL_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def is_full_disk(error: BaseException) -> bool:
    """A write refused for want of space: a full disk, or the user's quota spent."""
    return isinstance(error, OSError) and error.errno in _FULL_DISK_ERRNOS


def _no_space_to_append(path) -> UserError:
    return UserError(f"out of disk space while writing {path}; the records written before are kept; "
                     "free some space and run the same command again to continue.")


def _no_space_to_replace(path: Path) -> UserError:
    return UserError(f"out of disk space while writing {path}; any earlier {path.name} there is "
                     "unchanged; free some space and run the command again.")


def read_records(path: str | Path, repair: bool = False) -> list[dict]:
    """Read a JSONL file written by `append_records`.

    A last line without its newline is the trace of a kill mid-write: it is ignored (and removed
    from the file when `repair` is set). A malformed line anywhere else is a user error.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete_end = data.rfind(b"\n") + 1
    records = []
    for lineno, raw in enumerate(data[:complete_end].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}, line {lineno}: not valid JSON ({e.msg}); fix or remove that line."
            ) from None
        if not isinstance(record, dict):
            raise UserError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}.")
        records.append(record)
    if repair and complete_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(complete_end)
            f.flush()
            os.fsync(f.fileno())
    return records


def records_kept(path: str | Path) -> int:
    """How many records a stopped run left in `path` (a line cut by the stop not counted), for
    the sentence Ctrl-C gets; 0 for no file, or one that is not a JSONL of records."""
    try:
        return len(read_records(path)) if Path(path).is_file() else 0
    except (UserError, OSError):
        return 0


def kept_so_far(path: str | Path, noun: str, verb: str) -> str:
    """What a stopped run left in `path`, for the sentence that says so before saying how a rerun
    continues: kept_so_far(out, "row", "labeled") is "OUT keeps 2 rows labeled so far", or
    "nothing is in OUT yet"."""
    kept = records_kept(path)
    return f"{path} keeps {counted(kept, noun)} {verb} so far" if kept else f"nothing is in {path} yet"


def recorded_path(path) -> str | None:
    """A path as a record (eval.json, pairs.jsonl) holds it: absolute when it exists here, so
    that the same model or file named from another directory reads the same; else as given
    (a Hub id)."""
    if not path:  # None, or "" (which Path would read as the current folder)
        return path
    return os.path.abspath(path) if Path(path).exists() else str(path)


def record_line_numbers(path: str | Path) -> list[int]:
    """The line number of each record `read_records` returns (it skips blank lines and a partial
    last line), so that a message about a record can name its line in the file."""
    data = Path(path).read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    return [n for n, raw in enumerate(complete.splitlines(), start=1) if raw.strip()]


def check_out_file(out: str | Path, example: str, source: str | Path, source_name: str) -> Path:
    """`--out` as a command that appends or replaces it needs it: a file, and not the file the
    command reads (`source`, named `source_name` to the user), which a resume or an atomic
    write would cut or replace. `example` is the file name the sentence suggests."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the file to write, e.g. --out {out / example}.")
    if out.resolve() == Path(source).resolve():
        raise UserError(f"--out {out} is the {source_name} itself; choose another --out, e.g. {example}.")
    return out


def make_parent_folder(path: str | Path, option: str = "--out") -> None:
    """Create the folder `path` will be written in, as every command does for its --out; a file
    standing where one of its folders goes is the user's to move, so it is one sentence."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{option} {path}: {Path(path).parent} cannot be a folder, a file holds its place; "
                        "name a file in a folder.") from None


try:
    import fcntl
except ImportError:  # no flock on this system: leftovers of killed writers stay, as before
    fcntl = None

TEMP_HEX_BYTES = 6  # random part of a temporary file's name, in bytes
STALE_TEMP_S = 5 * 60  # a temporary file untouched this long, and unlocked, is a killed writer's


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync, rename over it, fsync the folder.

    A crash leaves either the old file or the new one, never half of one; the temporary file a
    kill leaves behind is deleted by the next write of `path` (`_remove_stale_temps`).
    """
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """`write_text_atomic` for bytes (a PNG plot)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"{path}: the folder {path.parent} does not exist; create it first.")
    _remove_stale_temps(path)
    try:
        fd, tmp = _create_temp_beside(path)
    except OSError as e:  # no room for even an empty file (no free inodes)
        if is_full_disk(e):
            raise _no_space_to_replace(path) from None
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # still open, so still locked: no sweep takes it for a leftover
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if is_full_disk(e):
            raise _no_space_to_replace(path) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def _create_temp_beside(path: Path) -> tuple[int, str]:
    """A new, empty temporary file in `path`'s folder with the permissions `open(path, "w")`
    would give: an existing `path`'s own, else 0666 less the umask.

    `tempfile.mkstemp` makes its files 0600, which suits secrets but hid eval.json, samples.jsonl
    and D.jsonl from the group and others, unlike every other output. Letting `os.open` apply
    the umask avoids reading it, which (through `os.umask`) would briefly change it for every
    thread of the process.
    """
    try:
        keep_mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        keep_mode = None
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(TEMP_HEX_BYTES)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue  # a name already taken: draw another
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until the rename: this file is not a leftover
        except OSError:  # a file system without locks: the age of a leftover still guards it
            pass
    if keep_mode is not None:
        os.fchmod(fd, keep_mode)
    return fd, tmp


def _remove_stale_temps(path: Path) -> None:
    """Delete the temporary files that writers of `path` killed before their rename (SIGKILL,
    the OOM killer, a power cut) left beside it; nothing else ever removes them.

    Only names of the exact form `_create_temp_beside` gives for this `path`, and only files
    both unlocked (a live writer holds its lock from creating the file until the rename; the
    operating system drops it with the process) and untouched for STALE_TEMP_S (a writer that
    has created its file but not yet locked it, or a writer on a file system without locks).
    Anything in doubt is left; this never fails the write it comes before."""
    if fcntl is None:  # cannot tell a live writer's file from a leftover
        return
    leftover = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{{2 * TEMP_HEX_BYTES}}}\.tmp")
    try:
        with os.scandir(path.parent) as entries:
            names = [entry.name for entry in entries if leftover.fullmatch(entry.name)]
    except OSError:
        return
    for name in names:
        candidate = path.parent / name
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:  # gone already, a link, or not ours to read
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a writer holds it
            held = os.fstat(fd)
            if (stat.S_ISREG(held.st_mode) and time.time() - held.st_mtime > STALE_TEMP_S
                    and os.lstat(candidate).st_ino == held.st_ino):  # still the file checked
                os.unlink(candidate)
        except OSError:
            pass
        finally:
            os.close(fd)


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> int:
    """All `rows` as JSON lines, atomically; returns how many were written."""
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    write_text_atomic(path, "".join(lines))
    return len(lines)


def write_json_atomic(path: str | Path, payload) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
