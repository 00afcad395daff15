"""Property-based tests: whatever a preference file holds, loading ends in pairs or one UserError.

Hypothesis writes JSONL, JSON and CSV files from rows that are valid, duplicated (chosen ==
rejected) or broken (junk values, nested junk, wrong types, missing or empty fields, lone
surrogates), with random unicode (line and paragraph separators, NUL, BOM characters, emoji),
strings over 128 KiB, byte-order marks, CRLF line ends, empty files and truncated last lines.
The generator knows what it wrote, so each case has one right answer:
- a broken row or a truncated last line: a UserError naming the file and that row's line;
- otherwise: every row accounted for (kept + skipped == rows written), kept text unchanged,
  and every kept pair tokenizes.
Any other exception fails the test.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preftune.data.io import load_pairs
from preftune.data.tokenize import tokenize_pair
from preftune.errors import UserError

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.data_too_large])

# Characters that break naive line handling or text checks.
SPECIALS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x00", "\ufeff", "\u200b", "\t",
            "\n", "\r", "\"", ",", "\\", "{", "}", "😀", "\u202e", "é", "ß"]
unicode_char = st.one_of(st.characters(blacklist_categories=("Cs",)), st.sampled_from(SPECIALS))
short_text = st.text(unicode_char, min_size=1, max_size=20).filter(lambda t: t.strip())
# Over csv's default 128 KiB field limit; rare, so the suite stays fast.
huge_text = st.builds(lambda c, n: "x" + c * n, unicode_char, st.integers(140_000, 160_000))
response = st.one_of(short_text, short_text, short_text, short_text, short_text, huge_text)

junk_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(unicode_char, max_size=10))
junk = st.recursive(junk_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)), max_leaves=12)
wrong_type = st.one_of(st.integers(), st.floats(), st.booleans(), st.dictionaries(st.text(max_size=3), junk,
                       max_size=3), st.lists(st.integers(), min_size=1, max_size=3))


@dataclass
class Row:
    value: object  # what is written: a dict for a row, anything for junk
    kind: str  # "valid", "duplicate" (counted as skipped) or "bad" (must raise)


@st.composite
def valid_row(draw, conversational_ok=True):
    prompt, chosen, rejected = draw(short_text), draw(response), draw(response)
    if chosen == rejected:
        rejected += "!"
    if conversational_ok and draw(st.booleans()):
        prompt = [{"role": "user", "content": prompt}]
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    row.update(draw(st.dictionaries(st.sampled_from(["pair_id", "id", "score", "meta"]), junk, max_size=2)))
    return Row(row, "valid")


@st.composite
def duplicate_row(draw):
    text = draw(short_text)
    return Row({"prompt": draw(short_text), "chosen": text, "rejected": text}, "duplicate")


@st.composite
def bad_row(draw):
    base = draw(valid_row(conversational_ok=False)).value
    how = draw(st.sampled_from(["not an object", "missing", "wrong type", "empty", "surrogate", "null"]))
    field = draw(st.sampled_from(["chosen", "rejected"]))
    if how == "not an object":
        return Row(draw(junk.filter(lambda v: not isinstance(v, dict))), "bad")
    if how == "missing":
        del base[field]
    elif how == "wrong type":
        base[field] = draw(wrong_type)
    elif how == "empty":
        base[field] = draw(st.sampled_from(["", "   ", "\n\t", "\u2028"]))
    elif how == "surrogate":
        base[field] = "ok \ud800 text"
    else:
        base[field] = None
    return Row(base, "bad")


json_rows = st.lists(st.one_of(valid_row(), valid_row(), duplicate_row(), bad_row()), max_size=8)
decorations = st.fixed_dictionaries({"bom": st.booleans(), "crlf": st.booleans(), "truncate": st.booleans(),
                                     "blank_lines": st.booleans()})


# ---------------------------------------------------------------------------- checking


@cache
def tokenizer():
    from preftune.demo.tiny import train_tokenizer

    return train_tokenizer()


def check(path: Path, rows: list[Row], expected_error_at: str | tuple[str, ...] | None) -> None:
    """`expected_error_at`: None when the file must load, else the place (or one of the places)
    the error must name: "line 3", "row 2", or "file" for a problem of the whole file."""
    try:
        result = load_pairs(str(path))
    except UserError as e:
        message = str(e)
        assert expected_error_at is not None, f"refused a good file: {message}"
        assert str(path) in message, message
        places = (expected_error_at,) if isinstance(expected_error_at, str) else expected_error_at
        if "file" not in places:
            assert any(re.search(rf"\b{place}\b", message) for place in places), (places, message)
        return
    assert expected_error_at is None, f"accepted a file that should fail at {expected_error_at}"
    kept = [r.value for r in rows if r.kind == "valid"]
    assert len(result.pairs) == len(kept)
    assert sum(result.skipped.values()) == sum(r.kind == "duplicate" for r in rows)
    assert result.rows_read == len(rows)
    for pair, row in zip(result.pairs, kept, strict=True):
        assert (pair.prompt, pair.chosen, pair.rejected) == (row["prompt"], row["chosen"], row["rejected"])
        if len(str(row)) < 5_000:  # BPE over a 150K-character word is slow and proves nothing more
            tokenize_pair(pair, tokenizer())  # must not raise on anything the loader let through


def escape_surrogates(text: str) -> str:
    """Write lone surrogates as JSON escapes (as other tools do), keeping the file valid UTF-8."""
    return re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text)


def finish_bytes(text: str, deco: dict, last_line_start: int) -> bytes:
    """Encode, cut inside the last line (never all of it) when truncating, add a BOM."""
    data = text.encode("utf-8")
    if last_line_start >= 0:
        start = len(text[:last_line_start].encode("utf-8"))
        end = len(data.rstrip(b"\r\n"))
        data = data[: start + max(1, (end - start) // 2)]
    return (b"\xef\xbb\xbf" if deco["bom"] else b"") + data


def first_bad(rows: list[Row]) -> int | None:
    return next((i for i, r in enumerate(rows) if r.kind == "bad"), None)


# ---------------------------------------------------------------------------- formats


@SETTINGS
@given(rows=json_rows, deco=decorations)
def test_jsonl_loads_or_names_the_line(rows, deco):
    newline = "\r\n" if deco["crlf"] else "\n"
    lines = []
    for row in rows:
        if deco["blank_lines"]:
            lines.append("")
        lines.append(escape_surrogates(json.dumps(row.value, ensure_ascii=False)))
    text = "".join(line + newline for line in lines)
    truncated = deco["truncate"] and rows and len(lines[-1]) >= 2  # cutting 1 of 1 removes the row
    bad = first_bad(rows)
    line_of = {i: n + 1 for i, n in enumerate(k for k, line in enumerate(lines) if line)}
    if bad is not None:
        expected = f"line {line_of[bad]}"
    elif truncated:
        expected = f"line {len(lines)}"
    else:
        expected = None if rows else "file"
    last_start = len(text) - len(lines[-1] + newline) if truncated else -1
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prefs.jsonl"
        path.write_bytes(finish_bytes(text, deco, last_start))
        check(path, rows, expected)


@SETTINGS
@given(rows=json_rows, deco=decorations, wrapped=st.booleans())
def test_json_loads_or_names_the_row(rows, deco, wrapped):
    text = json.dumps({"data": [r.value for r in rows]} if wrapped else [r.value for r in rows],
                      ensure_ascii=False, indent=1)
    text = escape_surrogates(text)
    if deco["crlf"]:
        text = text.replace("\n", "\r\n")  # json.dumps escapes newlines inside strings
    bad = first_bad(rows)
    if deco["truncate"]:
        expected = "line"  # the decoder names the line where the text stops
        last_start = 0  # cut the document in half: a list or object cut short never parses
    else:
        expected = f"row {bad}" if bad is not None else (None if rows else "file")
        last_start = -1
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prefs.json"
        path.write_bytes(finish_bytes(text, deco, last_start))
        check(path, rows, expected)


# A lone CR inside a field counts as a line end for csv but not for editors; left out.
csv_text = st.text(unicode_char, min_size=1, max_size=20).filter(lambda t: t.strip() and "\r" not in t)
csv_huge_text = st.builds(lambda c, n: "x" + c * n, unicode_char.filter(lambda c: c != "\r"),
                          st.integers(140_000, 160_000))


@st.composite
def csv_row(draw):
    kind = draw(st.sampled_from(["valid", "valid", "valid", "duplicate", "bad"]))
    prompt, chosen = draw(csv_text), draw(st.one_of(csv_text, csv_text, csv_huge_text))
    rejected = chosen if kind == "duplicate" else draw(csv_text)
    if kind == "valid" and rejected == chosen:
        rejected += "!"
    cells = [prompt, chosen, rejected]
    if kind == "bad":
        how = draw(st.sampled_from(["empty", "fewer", "more"]))
        cells = {"empty": [prompt, chosen, " "], "fewer": [prompt, chosen], "more": cells + ["x"]}[how]
    return Row(cells, kind)


@SETTINGS
@given(rows=st.lists(csv_row(), max_size=8), deco=decorations)
def test_csv_loads_or_names_the_line(rows, deco):
    newline = "\r\n" if deco["crlf"] else "\n"
    out = io.StringIO(newline="")
    writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator=newline)
    writer.writerow(["prompt", "chosen", "rejected"])
    starts, first_lines, end_lines = [], [], []  # each record's first character, first and last line
    for row in rows:
        starts.append(len(out.getvalue()))
        first_lines.append(out.getvalue().count("\n") + 1)
        writer.writerow(row.value)
        end_lines.append(out.getvalue().count("\n"))
    text = out.getvalue()
    for row in rows:  # the loader's view of a row, for comparing kept text
        row.value = dict(zip(["prompt", "chosen", "rejected"], row.value, strict=False))
    bad = first_bad(rows)
    truncated = deco["truncate"] and rows
    # A cut inside the last record (which may span lines) is reported at the line where the
    # data stops; and since the whole file is decoded first, a character cut in half may be
    # reported before an earlier broken row. Any of those lines is a right answer.
    first_cut_line = (end_lines[-2] if len(rows) > 1 else 1) + 1
    cut_lines = tuple(f"line {n}" for n in range(first_cut_line, end_lines[-1] + 1)) if truncated else ()
    if bad is not None:  # a record is named by all the lines it spans
        first, last = first_lines[bad], end_lines[bad]
        expected = (f"line {last}" if first == last else f"lines {first}-{last}", *cut_lines)
    elif truncated:
        expected = cut_lines
    else:
        expected = None if rows else "file"
    last_start = starts[-1] if truncated else -1
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prefs.csv"
        path.write_bytes(finish_bytes(text, deco, last_start))
        check(path, rows, expected)


# ---------------------------------------------------------------------------- fixed cases


@pytest.mark.parametrize("suffix, content, names", [
    (".jsonl", b"", "file"),
    (".jsonl", b"\xef\xbb\xbf", "file"),
    (".jsonl", b"\n\r\n  \n", "file"),
    (".json", b"", "line 1"),
    (".csv", b"", "file"),
    (".csv", b"prompt,chosen,rejected\r\n", "file"),
    (".jsonl", b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n\xff\xfe\n', "line 2"),
    (".jsonl", b"[" * 100_000 + b"\n", "line 1"),
    (".json", b"[" * 100_000, "file"),
    (".jsonl", b'{"chosen": "a", "rejected": ' + b"9" * 5000 + b"}\n", "line 1"),
    (".jsonl", "\ufeff".encode() * 2 + b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n', "line 1"),
])
def test_hand_picked_hostile_files(tmp_path, suffix, content, names):
    path = tmp_path / f"prefs{suffix}"
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        load_pairs(str(path))
    assert str(path) in str(caught.value)
    if names != "file":
        assert names in str(caught.value)


def test_a_raw_line_separator_inside_a_jsonl_string_keeps_the_row_whole(tmp_path):
    rows = [{"prompt": "p\u2028q", "chosen": "a\x85b", "rejected": "c\u2029d"}] * 2
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    result = load_pairs(str(path))
    assert [p.chosen for p in result.pairs] == ["a\x85b", "a\x85b"]
