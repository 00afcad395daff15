"""`preftune.records`' atomic writers (label export's D.jsonl, eval.json, samples.jsonl)."""

import json
import os
import stat
from contextlib import contextmanager

import pytest

from preftune.records import write_json_atomic, write_jsonl_atomic


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
