"""Read response pairs (pairs.jsonl, see docs/CONTRACTS.md) for labeling.

Both the labeling server and `label auto` read the same file, so the checks live here once:
every row must carry a pair id, a prompt (text or a list of chat messages) and at least two
responses (`preftune sample --n N` writes N). A `Pair` keeps all of them: `label auto` scores
every one, while people compare two at a time, so `load_pairs(..., for_people=True)` refuses a
row with more than two rather than showing the first two and dropping the rest unseen. A bad
row is a `UserError` naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from preftune.errors import UserError, unreadable_file
from preftune.records import read_records, record_line_numbers

Prompt = str | list  # text, or a list of {role, content} messages


@dataclass(frozen=True)
class Pair:
    pair_id: str
    prompt: Prompt
    responses: tuple[str, ...]  # two or more, as sampled
    # Per response: cut by max_new_tokens rather than ended by the model (`preftune sample`
    # writes it; absent means ended). Training then closes it with no EOS.
    truncated: tuple[bool, ...] = (False, False)


def _check_prompt(prompt, where: str) -> Prompt:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        for i, message in enumerate(prompt):
            ok = (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            )
            if not ok:
                raise UserError(
                    f"{where}: prompt message {i} must be an object with string 'role' and "
                    f"'content'; fix that message."
                )
        return prompt
    raise UserError(f"{where}: 'prompt' must be text or a non-empty list of chat messages.")


def pair_from_record(record: dict, where: str) -> Pair:
    """Validate one pairs.jsonl object; `where` names the file and line for error messages."""
    if "responses" not in record and "chosen" in record and "rejected" in record:
        raise UserError(f"{where}: a labeled row (chosen/rejected), not a pair to label; pass the "
                        "pairs.jsonl written by `preftune sample` (this file can go to `preftune train`).")
    pair_id = record.get("pair_id")
    if not isinstance(pair_id, str) or not pair_id or len(pair_id) > 200:
        raise UserError(f"{where}: 'pair_id' must be a non-empty string (at most 200 characters).")
    if "prompt" not in record:
        raise UserError(f"{where}: the key 'prompt' is missing; every pair needs one.")
    prompt = _check_prompt(record["prompt"], where)
    responses = record.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise UserError(f"{where}: 'responses' must be a list of at least two strings.")
    if not all(isinstance(r, str) for r in responses):
        raise UserError(f"{where}: every one of the 'responses' must be a string.")
    truncated = record.get("truncated", [False] * len(responses))
    if (not isinstance(truncated, list) or len(truncated) != len(responses)
            or not all(isinstance(t, bool) for t in truncated)):
        raise UserError(f"{where}: 'truncated' must be a list of true/false, one per response "
                        f"({len(responses)}); fix it or remove the key.")
    return Pair(pair_id=pair_id, prompt=prompt, responses=tuple(responses),
                truncated=tuple(truncated))


def _refuse_more_than_two(pair: Pair, where: str) -> None:
    """People compare two responses; showing the first two of more would drop the rest unseen."""
    if len(pair.responses) > 2:
        raise UserError(
            f"{where}: pair {pair.pair_id!r} has {len(pair.responses)} responses, but people "
            f"compare two at a time; sample with `preftune sample --n 2` for people, or label "
            f"this file with `preftune label auto`, which keeps the best and the worst."
        )


def _unterminated_last_record(path: Path) -> list[tuple[int, dict]]:
    """`read_records` ignores a last line without a newline (the trace of a killed writer).
    A pairs file may be written by hand, though: keep that line if it is a whole JSON object,
    and say so if it is cut off, rather than dropping it silently."""
    data = path.read_bytes()
    tail = data[data.rfind(b"\n") + 1:]
    if not tail.strip():
        return []
    lineno = data.count(b"\n") + 1
    try:
        record = json.loads(tail)
    except (ValueError, UnicodeDecodeError):
        raise UserError(
            f"{path}, line {lineno}: the last line is cut off (was `preftune sample` killed?); "
            f"run it again to finish the file, or remove that line."
        ) from None
    if not isinstance(record, dict):
        raise UserError(f"{path}, line {lineno}: expected a JSON object.")
    return [(lineno, record)]


def load_pairs(path: str | Path, for_people: bool = False) -> list[Pair]:
    """All pairs of a pairs.jsonl file, in file order; duplicate pair ids are an error.

    for_people: the pairs go to annotators (`label serve`, `label import`, the demo's --human),
    who see exactly two responses, so a row with more is refused with its line.
    """
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "no such file"
        raise UserError(f"{path}: {what}; pass the pairs.jsonl written by `preftune sample`.")
    pairs: list[Pair] = []
    seen: dict[str, int] = {}
    try:
        records = list(zip(record_line_numbers(path), read_records(path)))
        records += _unterminated_last_record(path)
    except OSError as e:  # no permission to read it: one sentence, not a traceback
        raise unreadable_file(path, e) from None
    for lineno, record in records:
        where = f"{path}, line {lineno}"
        pair = pair_from_record(record, where)
        if for_people:
            _refuse_more_than_two(pair, where)
        if pair.pair_id in seen:
            raise UserError(
                f"{where}: pair_id {pair.pair_id!r} already used on line {seen[pair.pair_id]}; "
                f"pair ids must be unique."
            )
        seen[pair.pair_id] = lineno
        pairs.append(pair)
    return pairs
