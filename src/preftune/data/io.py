"""Reading preference data from files, `save_to_disk` folders and the Hugging Face Hub.

Every row is checked as it is read. A row that is broken (missing or non-string field, empty
response, malformed JSON) stops the load with one sentence naming the file, the line or row and
the field; a row whose chosen and rejected responses are identical carries no preference and is
skipped and counted. Nothing is dropped silently: `LoadResult` carries the counts.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from preftune.data.schema import PreferencePair
from preftune.errors import UserError, unreadable_file

FILE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}
# A response cut by max_new_tokens when it was sampled (`label auto` / `label export` mark it):
# training closes it with no EOS (preftune.data.tokenize).
TRUNCATED_KEYS = ("chosen_truncated", "rejected_truncated")
# Compressed text files (d.jsonl.gz, as Hub data sets often ship them): the suffix before names the format.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}


@dataclass
class LoadResult:
    pairs: list[PreferencePair]
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    source: str = ""
    split: str | None = None  # the split read; None for a source without splits (a file)

    @property
    def rows_read(self) -> int:
        return len(self.pairs) + sum(self.skipped.values())


def load_pairs(spec: str, split: str = "train", setting: str = "data.train / data.eval",
               split_inherited: bool = False, config: str | None = None) -> LoadResult:
    """Load D from a file, a `datasets.save_to_disk` folder, or a hub data set id.

    `setting` names where the user gave `spec` (`data.train`, `--data`), for the sentence that
    says it is wrong. `split_inherited`: `split` was not chosen for this source but carried over
    (data.split to data.eval when data.eval_split is unset), so a source without splits, a file,
    is read whole rather than refused. `config`: the config (subset) of a hub data set or data
    folder whose README.md declares several, `load_dataset`'s `name`."""
    path = Path(spec)
    split_read = split
    if path.is_dir():
        rows = _rows_from_saved_dataset(path, split, setting, split_inherited, config)
        if (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
            split_read = None  # one saved Dataset
    elif path.is_file():
        _refuse_a_split(spec, split, split_inherited)
        _refuse_a_config(spec, config, setting)
        rows, split_read = _rows_from_file(path), None
    elif _format_suffix(path) in FILE_SUFFIXES or spec.startswith((".", "/", "~")):
        raise UserError(f"data file {spec} does not exist; check {setting}.")
    else:
        rows = _rows_from_hub(spec, split, setting, config)
    result = parse_rows(rows, spec)
    result.split = split_read
    return result


def parse_rows(rows: Iterable[tuple[str, object]], source: str) -> LoadResult:
    result = LoadResult(pairs=[], source=source)
    with_prompt = without_prompt = None  # the first row of each kind
    for where, row in rows:
        # Text rows only: an implicit conversation's prompt is its shared leading messages, which
        # a row that lost its prompt does not have (that is an error of its own).
        if isinstance(row, dict) and isinstance(row.get("chosen"), str):
            if row.get("prompt") is not None:
                with_prompt = with_prompt or where
            else:
                without_prompt = without_prompt or where
            if with_prompt and without_prompt:
                # A row that lost its prompt (a merge, another tool) would silently train on the
                # shared start of its responses as the prompt.
                raise UserError(f"{without_prompt}: no 'prompt', while {with_prompt} has one; fill in "
                                "this row's prompt, or leave it out of every row to take the shared "
                                "start of chosen and rejected as the prompt.")
        pair = parse_row(row, where)
        if pair.chosen == pair.rejected:
            result.skipped["chosen == rejected"] += 1
            continue
        result.pairs.append(pair)
    if result.rows_read == 0:
        raise UserError(f"{source} holds no preference rows; expected prompt/chosen/rejected records.")
    return result


# ---------------------------------------------------------------------------- row checking


def parse_row(row: object, where: str) -> PreferencePair:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with chosen/rejected fields, got {type(row).__name__}.")
    if "responses" in row and "chosen" not in row and "rejected" not in row:
        raise UserError(f"{where}: a pairs.jsonl row (its 'responses' are not yet labeled); label the "
                        "file first with `preftune label auto` or `label serve` and `label export`, "
                        "and train on the D.jsonl they write.")
    for name in ("chosen", "rejected"):
        if name not in row or row[name] is None:
            raise UserError(f"{where}: missing field {name!r}; every row needs chosen and rejected.")
    chosen, rejected = row["chosen"], row["rejected"]
    conversational = isinstance(chosen, list)
    check = _check_messages if conversational else _check_text
    check(chosen, where, "chosen")
    check(rejected, where, "rejected")
    prompt = row.get("prompt")
    if conversational and isinstance(prompt, str) and chosen != rejected:
        prompt, chosen, rejected = _conversations_with_text_prompt(prompt, chosen, rejected, where)
    elif (prompt is None or conversational and isinstance(prompt, str)) and chosen == rejected:
        prompt = [] if conversational else ""  # skipped by the caller, counted as a duplicate
    elif prompt is None:
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected, where)
    elif conversational:
        _check_messages(prompt, where, "prompt", allow_empty=False)
        chosen, rejected = _after_a_repeated_prompt(prompt, chosen, rejected, where)
    else:
        _check_text(prompt, where, "prompt", allow_empty=True)
    if conversational and chosen != rejected:
        for name, response in (("chosen", chosen), ("rejected", rejected)):
            if all(_says_nothing(message) for message in response):
                # The template's empty assistant turn would be trained on as the response.
                raise UserError(f"{where}: field {name!r} is empty (its messages after the prompt have no "
                                "content); remove the row or fill in the response.")
    for name in TRUNCATED_KEYS:
        if name in row and not isinstance(row[name], bool):
            raise UserError(f"{where}: field {name!r} must be true or false, got {row[name]!r}.")
    meta = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    pair_id = meta.get("pair_id", meta.get("id"))
    return PreferencePair(prompt, chosen, rejected, origin=where,
                          pair_id=None if pair_id is None else str(pair_id), metadata=meta)


def _check_text(value, where: str, name: str, allow_empty: bool = False) -> None:
    if isinstance(value, list):
        raise UserError(f"{where}: field {name!r} is a message list while the others are text; "
                        "use text everywhere or messages everywhere.")
    if not isinstance(value, str):
        raise UserError(f"{where}: field {name!r} must be a string, got {type(value).__name__}.")
    if not allow_empty and not value.strip():
        raise UserError(f"{where}: field {name!r} is empty; remove the row or fill in the response.")
    check_encodable(value, where, name)


def check_encodable(value: str, where: str, name: str) -> None:
    """JSON escapes like \\ud800 decode to lone surrogates, which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: field {name!r} holds an invalid character at position {e.start} "
                        "(a lone UTF-16 surrogate, usually a broken \\u escape); fix the text.") from None


def _check_messages(value, where: str, name: str, allow_empty: bool = False) -> None:
    if not isinstance(value, list):
        raise UserError(f"{where}: field {name!r} must be a list of messages like the chosen one, "
                        f"got {type(value).__name__}.")
    if not value and not allow_empty:
        raise UserError(f"{where}: field {name!r} holds no messages.")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise UserError(f"{where}: {name}[{i}] must be an object with string 'role' and 'content'.")
        check_encodable(message["role"], where, f"{name}[{i}].role")
        check_encodable(message["content"], where, f"{name}[{i}].content")


def _says_nothing(message: dict) -> bool:
    """A message of blank content and nothing else (a tool call, say, is something)."""
    return not message["content"].strip() and not any(
        value for key, value in message.items() if key not in ("role", "content"))


def _after_a_repeated_prompt(prompt: list, chosen: list, rejected: list, where: str):
    """Full conversations beside their prompt messages (chosen = prompt + answer): kept whole, the
    prompt would be read twice and its turns trained on as the response's."""
    n = len(prompt)
    if chosen[:n] != prompt or rejected[:n] != prompt:
        return chosen, rejected
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if len(value) == n:
            raise UserError(f"{where}: {name} holds only the prompt's messages, no response; fill in the "
                            "response or remove the row.")
    return chosen[n:], rejected[n:]


def _conversations_with_text_prompt(prompt: str, chosen: list, rejected: list, where: str):
    """A text prompt beside message lists. UltraFeedback-binarized's layout: chosen and rejected
    are whole conversations that hold the prompt, which is then their shared leading messages;
    or they hold only the replies, and the text is the user's message."""
    if chosen and rejected and chosen[0] == rejected[0]:
        shared, chosen, rejected = _split_implicit_prompt(chosen, rejected, where)
        if not any(m["content"].strip() == prompt.strip() for m in shared):
            raise UserError(f"{where}: field 'prompt' is text found in none of the messages that chosen "
                            "and rejected share; make it the list of prompt messages, or drop it to take "
                            "the shared messages as the prompt.")
        return shared, chosen, rejected
    _check_text(prompt, where, "prompt")
    return [{"role": "user", "content": prompt}], chosen, rejected


def _split_implicit_prompt(chosen, rejected, where: str):
    """The prompt is what chosen and rejected share; the responses are what follows."""
    if isinstance(chosen, list):
        if not isinstance(rejected, list):
            raise UserError(f"{where}: chosen is a message list but rejected is not.")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise UserError(f"{where}: chosen and rejected share no leading messages, "
                            "so the prompt cannot be inferred; add a 'prompt' field.")
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not value:
                raise UserError(f"{where}: {name} has nothing after the shared prompt messages.")
        return prompt, chosen, rejected
    n = len(os.path.commonprefix([chosen, rejected]))
    if n == min(len(chosen), len(rejected)):
        raise UserError(f"{where}: one response is a prefix of the other, so the prompt cannot be "
                        "inferred; add an explicit 'prompt' field.")
    # Responses that part mid-word ("Hel|lo", "Hel|p") start at the word, as the model generates
    # it; TRL cuts at the differing character, which trains "lo" and "p" as the responses.
    # Where they part between words ("A:|Blue", "\n|Blue") the prompt keeps all it shares, as in
    # TRL: cutting back to the last whitespace made "\nA:" part of both responses.
    if n and chosen[n - 1].isalnum() and (chosen[n].isalnum() or rejected[n].isalnum()):
        word_start = max(chosen.rfind(" ", 0, n), chosen.rfind("\n", 0, n)) + 1
        if word_start > 1:
            n = word_start
    # A space before the word goes with it (" word", one token for BPE tokenizers; TRL's rule too).
    if n > 1 and chosen[n - 1] == " ":
        n -= 1
    prompt, chosen_rest, rejected_rest = chosen[:n], chosen[n:], rejected[n:]
    if not prompt.strip():
        # Nothing shared: the prompt is most likely in a field of another name ("question",
        # "instruction"), which would be kept as metadata and never trained on.
        raise UserError(f"{where}: no 'prompt', and chosen and rejected share no start to take as "
                        "one; add a 'prompt' field (\"\" for none).")
    return prompt, chosen_rest, rejected_rest


# ---------------------------------------------------------------------------- sources


def _format_suffix(path: Path) -> str:
    """.jsonl for d.jsonl and for d.jsonl.gz."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) > 1 and suffixes[-1] in COMPRESSIONS:
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


def _file_reader(path: Path):
    """The function that reads a file of this name's format, or None for a format it is not."""
    suffix = _format_suffix(path)
    if suffix == ".parquet":
        return _rows_from_parquet if path.suffix.lower() == ".parquet" else None  # not compressed
    return {".jsonl": _rows_from_jsonl, ".json": _rows_from_json, ".csv": _rows_from_csv}.get(suffix)


def _rows_from_file(path: Path) -> Iterator[tuple[str, object]]:
    reader = _file_reader(path)
    if reader is None:
        raise UserError(f"{path}: unknown file type {''.join(path.suffixes[-2:]) or '(none)'}; "
                        "use .jsonl, .json, .csv (each may be compressed: .gz, .bz2, .xz), .parquet "
                        "or a data set folder.")
    return reader(path)


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when its name ends in .gz, .bz2 or .xz."""
    try:
        data = path.read_bytes()
    except OSError as e:  # no permission to read it: one sentence, not a traceback
        raise unreadable_file(path, e) from None
    compression = COMPRESSIONS.get(path.suffix.lower())
    if compression is None:
        return data
    import bz2
    import gzip
    import lzma

    module = {"gzip": gzip, "bz2": bz2, "lzma": lzma}[compression]
    try:
        return module.decompress(data)
    except (OSError, EOFError, ValueError, lzma.LZMAError) as e:  # a damaged or truncated file
        raise UserError(f"{path}: not a readable {path.suffix} file ({e}); check the download "
                        "or decompress it yourself.") from None


def decode_text(data: bytes, path) -> str:
    """A text file's bytes as text. A byte that is not UTF-8 raises a `UserError` naming the
    file's line and byte: a byte offset alone is hard to find in an editor."""
    try:
        # utf-8-sig drops a byte-order mark that editors on Windows like to add.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # After a byte-order mark the codec counts from the byte after it (e.object lacks it).
        start = e.start + len(data) - len(e.object)
        raise _not_utf8(path, data[:start].count(b"\n") + 1, e.reason, start) from None


def _not_utf8(path, line: int, reason: str, byte: int) -> UserError:
    """The one sentence for a byte that is not UTF-8, `byte` counted from the file's start."""
    return UserError(f"{path}, line {line}: not UTF-8 text ({reason} at byte {byte}); re-save it as UTF-8.")


def _read_text(path: Path) -> str:
    return decode_text(_read_bytes(path), path)


def _rows_from_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    whole = _read_bytes(path)
    data = whole.removeprefix(b"\xef\xbb\xbf")  # a BOM that Windows editors add
    offset = len(whole) - len(data)  # of the line's first byte in the file, as decode_text counts
    # Split on "\n" alone: str.splitlines() also breaks at U+2028, U+0085 and other characters
    # that JSON strings may hold raw, which would cut valid rows apart and shift line numbers.
    # Each line is decoded on its own, so problems are reported in line order.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}, line {lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(path, lineno, e.reason, offset + e.start) from None
        offset += len(raw) + 1
        if not line.strip():
            continue
        yield where, _parse_json(line, where)


class _RepeatedField(Exception):
    pass


def _unique_fields(pairs: list[tuple[str, object]]) -> dict:
    """json.loads keeps the last of a field written twice and drops the first without a word."""
    row = {}
    for key, value in pairs:
        if key in row:
            raise _RepeatedField(key)
        row[key] = value
    return row


def _parse_json(text: str, where: str):
    """json.loads with every failure it can raise turned into one sentence naming `where`."""
    try:
        return json.loads(text, object_pairs_hook=_unique_fields)
    except _RepeatedField as e:
        raise UserError(f"{where}: field {e.args[0]!r} is written twice; keep one.") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                        "fix or remove it.") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply to read; flatten or remove it.") from None
    except ValueError as e:  # e.g. an integer literal longer than Python's 4300-digit limit
        raise UserError(f"{where}: unreadable JSON value ({str(e)[:120]}); fix or remove it.") from None


def _rows_from_json(path: Path) -> Iterator[tuple[str, object]]:
    text = _read_text(path)
    try:
        data = json.loads(text, object_pairs_hook=_unique_fields)
    except _RepeatedField as e:
        raise UserError(f"{path}: a row writes field {e.args[0]!r} twice; keep one.") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            # One object per line under a .json name, as many Hub data sets ship them.
            yield from _rows_from_jsonl(path)
            return
        raise UserError(f"{path}, line {e.lineno}: malformed JSON ({e.msg}).") from None
    except (RecursionError, ValueError):  # deep nesting, the integer-digit limit: no position
        data = _parse_json(text, str(path))
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    elif isinstance(data, dict) and ("chosen" in data or "rejected" in data) and not _columns(data):
        # One row: JSON Lines of one line (what Dataset.to_json writes for a one-pair data set),
        # named by its line, or one object over several lines (json.dump(row, f, indent=2)),
        # which read line by line was "line 1: malformed JSON".
        if "\n" in text.strip():
            yield f"{path}, row 0", data
        else:
            yield from _rows_from_jsonl(path)
        return
    if not isinstance(data, list):
        shape = " (this one holds a dict of columns)" if isinstance(data, dict) and _columns(data) else ""
        raise UserError(f"{path}: a .json data file must hold a list of rows{shape}; use .jsonl for one "
                        "row per line.")
    for i, row in enumerate(data):
        yield f"{path}, row {i}", row


def _columns(data: dict) -> bool:
    """Whether a JSON object holds the data set column by column ({"chosen": [text, ...], ...},
    json.dump of Dataset.to_dict) rather than being one row, whose chosen is text or messages."""
    chosen = data.get("chosen", data.get("rejected"))
    return isinstance(chosen, list) and not all(isinstance(item, dict) for item in chosen)


def _rows_from_csv(path: Path) -> Iterator[tuple[str, object]]:
    import io

    # The default limit (128 KiB per field) refuses long responses that are perfectly valid.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    # strict: a quoted field cut off by a truncated file is an error, not a shorter response.
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), strict=True)
    _refuse_a_repeated_column(reader, path)
    while True:
        try:
            _ = reader.fieldnames  # reads the header, if not yet read, so line_num counts past it
            first = reader.line_num + 1  # a quoted field may span lines: name them all
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # DictReader's own line_num only moves on a good row
            raise UserError(f"{path}, line {reader.reader.line_num}: unreadable CSV ({e}).") from None
        last = reader.line_num
        where = f"{path}, line {last}" if first == last else f"{path}, lines {first}-{last}"
        if None in row:
            raise UserError(f"{where}: more values than header columns.")
        for name in ("prompt", "chosen", "rejected"):
            if _message_list_as_text(row.get(name)):
                # Trained on as text, the Python repr of a conversation looks like any response.
                raise UserError(f"{where}: field {name!r} holds a list of messages written out as text "
                                "(as pandas' and datasets' to_csv write one), which CSV cannot hold; save "
                                "the data as JSONL (Dataset.to_json) or Parquet.")
        yield where, {k: v for k, v in row.items() if v != "" or k != "prompt"}


def _message_list_as_text(text) -> bool:
    """Whether a CSV cell holds a list of {role, content} messages as its Python or JSON text."""
    if not isinstance(text, str) or not (text.lstrip().startswith("[{") and text.rstrip().endswith("}]")):
        return False
    import ast

    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _refuse_a_repeated_column(reader: csv.DictReader, path: Path) -> None:
    """DictReader keeps the last of two columns of one name and drops the first without a word."""
    try:
        names = reader.fieldnames or []
    except csv.Error:
        return  # the row loop names the line
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"{path}, line 1: column {repeated[0]!r} appears twice in the header; keep one.")


def _rows_from_parquet(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable Parquet file ({e}).") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}, row {i}", row


def _refuse_a_split(source, split: str, inherited: bool) -> None:
    """A file, or a single saved Dataset, is read whole. A split other than the default asked of
    it would be ignored, and `data.eval_split: test` on the training file would then evaluate on
    training pairs, so it is refused, unless `inherited` (data.split carried over to data.eval)."""
    if split != "train" and not inherited:
        raise UserError(f"{source} has no splits, so split {split!r} cannot be chosen from it; remove "
                        "the split (data.split, data.eval_split or --split) or name the file holding it.")


def _config_key(setting: str) -> str:
    """The key or option that picks the config of the source given in `setting`."""
    keys = {"data.train": "data.config", "data.eval": "data.eval_config",
            "data.train / data.eval": "data.config (data.eval_config for data.eval)"}
    return keys.get(setting, "--data-config")  # eval pairs' --data, data inspect's FILE


def _refuse_a_config(source, config: str | None, setting: str) -> None:
    """A file or a save_to_disk folder has no configs: a config named for it would be ignored."""
    if config is not None:
        raise _no_configs(source, config, setting)


def _no_configs(source, config: str, setting: str) -> UserError:
    key = _config_key(setting)
    return UserError(f"{source} has no configs (subsets), so {key} {config!r} cannot be chosen from it; "
                     f"remove {key} or point {setting} at the data set that has it.")


def _config_error(source, config: str | None, error: Exception, setting: str) -> UserError | None:
    """One sentence for a data set of several configs read without one, or with one it lacks;
    None for any other error. `datasets` lists the configs in its message: 'Please pick one among
    the available configs: ['en', 'de']', "BuilderConfig 'x' not found. Available: ['en', 'de']",
    and offline, from its cache, "configurations in the cache: en, de" or 'Available configs in
    the cache: ['de', 'en']'."""
    import ast
    import re

    text = str(error)
    found = re.search(r"(?:configs|Available|in the cache): (\[[^\]\n]*\]|[^\n]*)", text)
    if not isinstance(error, ValueError) or "config" not in text.lower() or not found:
        return None
    listed = found.group(1)
    try:
        names = [str(n) for n in ast.literal_eval(listed)] if listed.startswith("[") else listed.split(", ")
    except (ValueError, SyntaxError):
        return None
    key = _config_key(setting)
    shown = ", ".join(repr(name) for name in sorted(names))  # the cache lists them in file-system order
    if config is None:
        return UserError(f"{source} has several configs (subsets), {shown}, and none is its default; "
                         f"choose one with {key}.")
    if names == ["default"]:
        return _no_configs(source, config, setting)
    return UserError(f"{source} has no config {config!r}, only {shown}; choose one of them with {key}.")


def _no_such_split(source, split: str, splits) -> UserError:
    names = ", ".join(repr(name) for name in splits)
    return UserError(f"{source} has no split {split!r}, only {names}; choose one of them (data.split, "
                     "data.eval_split for data.eval, or --split).")


def _rows_from_saved_dataset(path: Path, split: str, setting: str, split_inherited: bool,
                             config: str | None) -> Iterator[tuple[str, object]]:
    import datasets

    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        # Not written by save_to_disk: a folder of data files, like a data set downloaded from
        # the Hub (data/train-00000-of-00002.parquet, ...), read as `load_dataset` reads it.
        yield from _rows_from_data_folder(path, split, setting, config)
        return
    _refuse_a_config(path, config, setting)
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(f"{path} is a folder but not one written by datasets.save_to_disk.") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise _no_such_split(path, split, ds)
        ds = ds[split]
    else:
        _refuse_a_split(path, split, split_inherited)
    for i, row in enumerate(ds):
        yield f"{path}, row {i}", row


def _rows_from_data_folder(path: Path, split: str, setting: str,
                           config: str | None) -> Iterator[tuple[str, object]]:
    """Data files in a folder, split by their names (train-*.parquet, test.jsonl.gz, ...) or by
    the folder's README.md (its `configs:` block, of which `config` picks one), as `load_dataset`
    finds them. Each file is read as it would be given alone, so a bad row is named by its file
    and line, and shards need not share their columns; formats preftune does not read itself
    (.arrow, ...) are streamed by `datasets`. Nothing is copied into the datasets cache."""
    import datasets
    from datasets.load import dataset_module_factory

    try:
        declared = dataset_module_factory(str(path)).builder_configs_parameters.metadata_configs
        found = datasets.load_dataset_builder(str(path), name=config).config.data_files or {}
    except Exception as e:  # no data files, several configs, unreadable files: datasets says which
        raise (_config_error(path, config, e, setting) or _files_not_data(path, setting)
               or _no_data_folder(path, e, setting)) from None
    data_files = {str(name): files for name, files in found.items()}  # split -> files
    if split not in data_files:
        raise _no_split_in_data_folder(path, split, data_files, setting)
    if not declared:  # a README's configs name their files; found by name, one format is kept
        _refuse_files_left_out(path, split, data_files[split], setting)
    files = [Path(f) for f in data_files[split]]
    if all(_file_reader(f) for f in files):
        for f in files:
            yield from _rows_from_file(f)
        return
    try:
        rows = iter(datasets.load_dataset(str(path), name=config, split=split, streaming=True))
    except Exception as e:
        raise _no_data_folder(path, e, setting) from None
    for i in itertools.count():
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # a damaged shard shows only when it is read
            raise UserError(f"{path} ({split}), row {i}: its data files cannot be read ({_first_line(e)}); "
                            "check the files of that split, or convert them to .parquet or .jsonl.") from None
        yield f"{path} ({split}), row {i}", row


def _data_extensions() -> list[str]:
    """The suffixes of the files `load_dataset` reads."""
    from datasets import packaged_modules

    # datasets' full list of extensions is a private name; should a later version rename it,
    # the formats preference data comes in still keep the checks working.
    return getattr(packaged_modules, "_ALL_ALLOWED_EXTENSIONS",
                   [".jsonl", ".json", ".ndjson", ".csv", ".tsv", ".parquet", ".arrow", ".txt"])


def _files_not_data(path: Path, setting: str) -> UserError | None:
    """A folder whose split names take in files of no data format (a folder of training runs:
    checkpoints/step-000100/training_state.pt matches 'train*') stopped `load_dataset` with its
    own words in brackets; this names each split's files and those that are no data. None when
    every file the splits take is of a data format."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        splits = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    except Exception:  # no files at all, say: _no_data_folder gives datasets' words
        return None
    extensions = set(_data_extensions())
    not_data = [f for files in splits.values() for f in files
                if not extensions.intersection(Path(f).suffixes)]  # train.jsonl.gz is data
    if not not_data:
        return None
    per_split = [f"{str(name)!r} ({_some_files(path, files)})" for name, files in splits.items()]
    splits_read = ", ".join(per_split[:-1]) + " and " + per_split[-1] if len(per_split) > 1 else per_split[0]
    return UserError(f"{path} is no data set: it is no datasets.save_to_disk folder (no dataset_dict.json "
                     f"or state.json), and as a folder of data files its splits would be {splits_read}, "
                     f"though {_some_files(path, not_data)} {'is' if len(not_data) == 1 else 'are'} no data "
                     f"file; point {setting} at the data file itself ({', '.join(sorted(FILE_SUFFIXES))}), "
                     "a save_to_disk folder or a folder holding only data files.")


def _refuse_files_left_out(path: Path, split: str, files: list, setting: str) -> None:
    """`load_dataset` reads only a folder's most common data format and leaves the split's other
    files out without a word. They are often the same data again (data/train.parquet beside the
    train.jsonl it was converted from), so reading them too could train on every pair twice: the
    user says which files are the data."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    every = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path),
                                        allowed_extensions=_data_extensions())
    kept = set(files)
    left_out = [f for name, found in every.items() if str(name) == split for f in found if f not in kept]
    if left_out:
        # data.train and data.eval take a list of files; --data and data inspect's FILE take one.
        remedy = (f"list the files to read in {setting}" if setting.startswith("data.")
                  else f"point {setting} at one of those files")
        raise UserError(f"{path} mixes data formats in split {split!r}: load_dataset reads only "
                        f"{_some_files(path, files)} and leaves out {_some_files(path, left_out)}; "
                        f"{remedy}, or move the others out of the folder.")


def _some_files(folder: Path, files: list) -> str:
    """The first three files, relative to `folder`, and how many more."""
    names = [os.path.relpath(f, folder) for f in files]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__


def _no_data_folder(path: Path, error: Exception, setting: str) -> UserError:
    return UserError(f"{path} is a folder neither written by datasets.save_to_disk nor readable as "
                     f"data files ({_first_line(error)}); point {setting} at a file or such a folder.")


def _no_split_in_data_folder(path: Path, split: str, data_files, setting: str) -> UserError:
    """A folder that is no data set (run folders, say) has its files taken as splits by their
    names (a/eval.json is 'test'): name the files, so the user sees what was read as data."""
    splits = list(data_files)
    shown = _some_files(path, [f for found in data_files.values() for f in found])
    names = ", ".join(repr(name) for name in splits)
    return UserError(f"{path} has no split {split!r}: it is no datasets.save_to_disk folder (no "
                     f"dataset_dict.json or state.json), and as a folder of data files its splits are only "
                     f"{names} ({shown}); point {setting} at a data file ({', '.join(sorted(FILE_SUFFIXES))}), "
                     f"a save_to_disk folder or a folder of data files with a {split!r} split, or choose "
                     "one of its splits (data.split, data.eval_split for data.eval, or --split).")


def _rows_from_hub(spec: str, split: str, setting: str, config: str | None) -> Iterator[tuple[str, object]]:
    import datasets

    try:
        ds = datasets.load_dataset(spec, name=config, split=split)
    except Exception as e:  # offline, unknown id, or gated: all end the same way for the user
        if wrong_config := _config_error(f"the hub data set {spec!r}", config, e, setting):
            raise wrong_config from None
        reason = _first_line(e)
        if datasets.config.HF_HUB_OFFLINE and isinstance(e, ConnectionError):  # not in the datasets cache
            raise UserError(f"{setting} {spec!r} is no file or folder here and not in the datasets cache "
                            f"{datasets.config.HF_DATASETS_CACHE}, and HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE=1) "
                            f"keeps it from the Hub; load it once where there is network (load_dataset({spec!r}) "
                            f"with this HF_HOME), or point {setting} at a local file, a save_to_disk folder or a "
                            "downloaded snapshot folder.") from None
        if isinstance(e, ValueError) and "split" in reason.lower():  # 'Unknown split "x". Should be one of [...]'
            raise UserError(f"the hub data set {spec!r} has no split {split!r} ({reason}); choose one of them "
                            "(data.split, data.eval_split for data.eval, or --split).") from None
        raise UserError(f"could not load the hub data set {spec!r} (split {split!r}): {reason}; "
                        "check the id and the network, or pass a local file.") from None
    for i, row in enumerate(ds):
        yield f"{spec}[{split}], row {i}", row
