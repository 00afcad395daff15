"""The preference pair: a prompt x, a chosen response y_w and a rejected response y_l."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

Message = dict  # {"role": str, "content": str}
Text = Union[str, list]  # a string, or a list of chat messages


@dataclass
class PreferencePair:
    prompt: Text
    chosen: Text
    rejected: Text
    origin: str = ""  # "file.jsonl, line 12": where the row came from, for error messages
    pair_id: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)
