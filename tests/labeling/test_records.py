"""`preftune.records`' atomic writers (label export's D.jsonl, eval.json, samples.jsonl)."""

import errno
import json
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest

from preftune.errors import UserError
from preftune.records import append_records, read_records, write_json_atomic, write_jsonl_atomic


@contextmanager
def umask(mask):
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_permissions_of_a_plain_open(tmp_path, mask, expected):
    # The temporary file behind the rename used to be 0600 whatever the umask.
    with umask(mask):
        write_jsonl_atomic(tmp_path / "D.jsonl", [{"a": 1}])
        write_json_atomic(tmp_path / "eval.json", {"b": 2})
        with open(tmp_path / "plain.txt", "w"):
            pass
    assert mode(tmp_path / "plain.txt") == expected
    assert mode(tmp_path / "D.jsonl") == expected
    assert mode(tmp_path / "eval.json") == expected
    assert json.loads((tmp_path / "eval.json").read_text()) == {"b": 2}


def test_a_rewritten_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "D.jsonl"
    write_jsonl_atomic(path, [{"a": 1}])
    os.chmod(path, 0o640)
    with umask(0o022):
        write_jsonl_atomic(path, [{"a": 2}])
    assert mode(path) == 0o640
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["D.jsonl"], "no temporary file left behind"


def _no_space(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_appending_keeps_the_file_as_it_was(tmp_path, monkeypatch):
    # sample and label auto append each batch; a full disk printed an OSError traceback and could
    # leave part of the batch (a torn last line) behind.
    path = tmp_path / "pairs.jsonl"
    append_records(path, [{"id": 0}])
    before = path.read_bytes()
    monkeypatch.setattr(os, "fsync", _no_space)  # some file systems report a full disk only here
    with pytest.raises(UserError, match=r"out of disk space while writing .*pairs\.jsonl; the records "
                                        r"written before are kept; free some space and run the same command"):
        append_records(path, [{"id": 1}, {"id": 2}])
    assert path.read_bytes() == before
    monkeypatch.undo()
    append_records(path, [{"id": 1}])
    assert read_records(path) == [{"id": 0}, {"id": 1}]


def test_a_write_cut_short_by_a_full_disk_is_taken_back(tmp_path, monkeypatch):
    path = tmp_path / "labels.jsonl"
    append_records(path, [{"id": 0}])
    before = path.read_bytes()
    real_write = os.write
    calls = []

    def half_then_full(fd, data):  # as the kernel does: part of the bytes, then ENOSPC
        calls.append(fd)
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        _no_space()

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(UserError, match="out of disk space"):
        append_records(path, [{"id": 1, "text": "x" * 100}])
    monkeypatch.undo()
    assert calls, "append_records writes through os.write"
    assert path.read_bytes() == before


@pytest.mark.parametrize("write", [write_jsonl_atomic, write_json_atomic])
def test_a_full_disk_while_replacing_keeps_the_earlier_file(tmp_path, monkeypatch, write):
    path = tmp_path / "out.json"
    path.write_text("earlier\n")
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(UserError, match=r"out of disk space while writing .*out\.json; any earlier out\.json "
                                        r"there is unchanged; free some space and run the command again\."):
        write(path, [{"a": 1}])
    assert path.read_text() == "earlier\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"], "no temporary file left behind"


def test_no_room_for_a_new_file_is_the_same_sentence(tmp_path, monkeypatch):
    # Creating the file itself fails on a disk without free inodes: that was still a traceback.
    real_open = os.open

    def no_new_files(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            _no_space()
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_new_files)
    with pytest.raises(UserError, match=r"out of disk space while writing .*pairs\.jsonl; the records"):
        append_records(tmp_path / "pairs.jsonl", [{"id": 0}])
    with pytest.raises(UserError, match=r"out of disk space while writing .*eval\.json; any earlier"):
        write_json_atomic(tmp_path / "eval.json", {"a": 1})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


# A writer that stops just before its rename: killed there, or held there (alive) until told to go on.
WRITER_STOPPED_BEFORE_RENAME = """
import os, signal, sys
from preftune.records import write_text_atomic

rename = os.replace

def stop_before_rename(tmp, path):
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    print(tmp, flush=True)
    sys.stdin.readline()
    rename(tmp, path)

os.replace = stop_before_rename
write_text_atomic(sys.argv[1], "from the other writer\\n")
"""


def _writer_stopped_before_rename(path, how):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", WRITER_STOPPED_BEFORE_RENAME, str(path), how],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _age(path, seconds=3600):
    os.utime(path, (path.stat().st_atime - seconds, path.stat().st_mtime - seconds))


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """A SIGKILL between creating `.D.jsonl.<hex>.tmp` and renaming it left that file (as large
    as D.jsonl) beside D.jsonl forever; the next write of D.jsonl now removes it once stale."""
    path = tmp_path / "D.jsonl"
    killed = _writer_stopped_before_rename(path, "kill")
    killed.communicate(timeout=120)
    assert killed.returncode == -9
    [leftover] = tmp_path.iterdir()
    assert re.fullmatch(r"\.D\.jsonl\.[0-9a-f]{12}\.tmp", leftover.name)

    write_jsonl_atomic(path, [{"a": 1}])
    assert leftover.exists(), "a minute-old leftover may be a writer that has not locked it yet"
    _age(leftover)
    write_jsonl_atomic(path, [{"a": 2}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D.jsonl"]
    assert read_records(path) == [{"a": 2}]


def test_a_live_writers_temporary_file_is_left_alone(tmp_path):
    """Two processes writing the same file: the one that writes second must not delete the
    temporary file of the first, however old it looks, while the first still runs."""
    path = tmp_path / "eval.json"
    other = _writer_stopped_before_rename(path, "hold")
    try:
        tmp = Path(other.stdout.readline().strip())
        _age(tmp)
        write_json_atomic(path, {"mine": True})
        assert tmp.exists()
    finally:
        other.communicate("go on\n", timeout=120)
    assert other.returncode == 0
    assert path.read_text() == "from the other writer\n"  # its rename found its file


def test_only_exact_leftovers_of_the_file_written_are_removed(tmp_path):
    kept = [".D.jsonl.0123456789ab.tmp.bak", "D.jsonl.0123456789ab.tmp", ".D.jsonl.0123456789.tmp",
            ".D.jsonl.0123456789AB.tmp", ".E.jsonl.0123456789ab.tmp", ".xD.jsonl.0123456789ab.tmp",
            ".D.jsonl.0123456789ab.tmp.0123456789ab.tmp"]
    for name in [*kept, ".D.jsonl.0123456789ab.tmp"]:
        (tmp_path / name).write_text("x")
        _age(tmp_path / name)
    (tmp_path / "folder").mkdir()
    os.symlink(tmp_path / "folder", tmp_path / ".D.jsonl.ba9876543210.tmp")  # a link: not ours
    write_jsonl_atomic(tmp_path / "D.jsonl", [{"a": 1}])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([*kept, "D.jsonl", "folder", ".D.jsonl.ba9876543210.tmp"])
