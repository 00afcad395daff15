"""Rows that repeat another row: the same prompt, chosen and rejected.

`preftune data inspect` counts them; training warns about them, since each copy is trained on
(the pair weighs 2x or more), and about data.eval pairs it trains on too (optimistic eval/).
Rows are compared as the held-out split compares prompts (heldout.prompt_key), by all that
tokenizing reads of them (data.tokenize): the texts, the *_truncated flags and a conversational
row's tools and template arguments; metadata such as ids or scores is left out, as training
reads none of it.
"""

from __future__ import annotations

from preftune.data.heldout import prompt_key
from preftune.data.io import TRUNCATED_KEYS
from preftune.data.schema import PreferencePair
from preftune.data.tokenize import chat_template_kwargs
from preftune.wording import counted


def row_key(pair: PreferencePair) -> str:
    """Equal keys: rows that tokenize alike. Besides prompt, chosen and rejected, a *_truncated flag
    drops the response's EOS (end of turn), and a conversational row's tools and template arguments
    change the rendered text: rows differing there are trained as different pairs.
    A resumed run compares its held-out pairs by this key too (heldout.check_heldout)."""
    cut = [pair.metadata.get(name) is True for name in TRUNCATED_KEYS]  # as tokenize._truncated reads them
    template = chat_template_kwargs(pair) if pair.conversational else {}
    return prompt_key([pair.prompt, pair.chosen, pair.rejected, cut, template])


def repeated_rows(pairs: list[PreferencePair]) -> list[tuple[PreferencePair, PreferencePair]]:
    """(row, the first row it repeats) for each row equal to an earlier one, in the data's order."""
    first: dict[str, PreferencePair] = {}
    repeats = []
    for pair in pairs:
        earlier = first.setdefault(row_key(pair), pair)
        if earlier is not pair:
            repeats.append((pair, earlier))
    return repeats


def rows_also_in(pairs: list[PreferencePair], others: list[PreferencePair]) -> list[tuple[PreferencePair, PreferencePair]]:
    """(row, the first row of `others` equal to it) for each row of `pairs` that `others` has too."""
    first: dict[str, PreferencePair] = {}
    for other in others:
        first.setdefault(row_key(other), other)
    return [(pair, first[key]) for pair in pairs if (key := row_key(pair)) in first]


def repeated_rows_warning(pairs: list[PreferencePair]) -> str | None:
    """The line training prints when data.train has duplicate rows, or None when it has none.
    The rows are kept: whether the extra weight is wanted is the user's call."""
    repeats = repeated_rows(pairs)
    if not repeats:
        return None
    row, earlier = repeats[0]
    return (f"data: data.train has {counted(len(repeats), 'duplicate row')}, the same prompt, chosen and "
            f"rejected as an earlier row (the first: {row.origin} repeats {earlier.origin}); training "
            "keeps every copy, so those pairs weigh 2x or more. Remove the duplicates from the data, or "
            "keep them if the extra weight is on purpose (`preftune data inspect` counts them).")


def eval_overlap_warning(train: list[PreferencePair], evaluated: list[PreferencePair]) -> str | None:
    """The line training prints when data.eval has pairs data.train has too, or None."""
    shared = rows_also_in(evaluated, train)
    if not shared:
        return None
    pair, trained = shared[0]
    return (f"data: data.train also has {counted(len(shared), 'pair')} of the {len(evaluated)} in data.eval, "
            f"the same prompt, chosen and rejected (the first: {pair.origin} is {trained.origin}); "
            "the policy is trained on them, so their eval/ numbers are optimistic. Remove them from "
            "data.train or from data.eval for an unbiased evaluation.")
