"""How responses are drawn: the settings of `preftune sample` and `eval generate`, as their
records store them. Kept apart from `preftune.sampling` so that reading records (reports,
eval.json bookkeeping) does not import torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from preftune.errors import UserError


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are drawn; stored verbatim as the record's `sampling` field.

    `temperature=0` means greedy decoding, which gives one response per prompt (`n=1`). Only
    these settings shape the distribution, applied in `transformers`' order: temperature, then
    top-k, then top-p (nucleus) on what top-k kept, then min-p (tokens below `min_p` times the
    likeliest token's probability dropped). Their defaults (1, 0, 1, 0) sample from the model's
    full distribution; unlike `transformers`' `generate`, top-k is off unless asked for.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    n: int = 2
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off

    def __post_init__(self):
        if self.n < 1:
            raise UserError(f"--n must be at least 1, got {self.n}.")
        if self.temperature < 0:
            raise UserError(f"--temperature must be 0 (greedy) or positive, got {self.temperature}.")
        if self.temperature == 0 and self.n > 1:
            # Greedy decoding is deterministic: all n responses would be the same text, pairs
            # with nothing to prefer.
            raise UserError(
                f"--temperature 0 (greedy) writes the same response {self.n} times per prompt; "
                f"set --temperature above 0 (e.g. 1.0) for different responses, or --n 1."
            )
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise UserError(f"--top-k must be 0 (off) or positive, got {self.top_k}.")
        if not 0 <= self.min_p < 1:
            raise UserError(f"--min-p must be in [0, 1) (0 is off), got {self.min_p}.")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}.")

    def to_dict(self) -> dict:
        """The settings as records store them. top-k and min-p came later and appear only when
        on, so a record of the same job reads the same whichever version wrote it (resuming,
        and telling one evaluation from another, compare these dicts)."""
        settings = asdict(self)
        for key, off in LATER_SETTINGS.items():
            if settings[key] == off:
                del settings[key]
        return settings

    @property
    def reshapes_distribution(self) -> bool:
        """Whether responses come from something other than the model's own distribution."""
        return describe_sampling(self.to_dict()) != ""


# Settings added to SamplingSettings after records were first written, at their "off" values.
LATER_SETTINGS = {"top_k": 0, "min_p": 0.0}


def describe_sampling(sampling: dict) -> str:
    """'temperature 0.7, top-k 50' for the settings of a record's `sampling` that reshape the
    model's distribution; '' when none does. Keys missing from older records are off."""
    parts = []
    for key, label, off in (("temperature", "temperature", 1.0), ("top_k", "top-k", 0),
                            ("top_p", "top-p", 1.0), ("min_p", "min-p", 0.0)):
        value = sampling.get(key, off)
        if value != off:
            parts.append(f"{label} {value:g}")
    return ", ".join(parts)
