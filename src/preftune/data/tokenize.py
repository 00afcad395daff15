"""Turning a preference pair into token ids, the way other DPO tools do, so curves compare.

Standard text: prompt ids = tokenize(prompt); each completion's ids are the part of
tokenize(prompt + completion) after the prefix it shares with the prompt ids, then EOS (not a
second one when the completion text already ends with the EOS token, as TRL does). A text that
already starts with the BOS token (a chat template rendered to a string) keeps that one BOS:
a tokenizer that adds BOS itself would otherwise put a second in front (TRL keeps both); the
same for a text ending with EOS and a tokenizer that appends EOS.
Conversational: the same, with the text rendered by the tokenizer's chat template (the prompt
with its generation prompt); the template closes the turn, so no EOS is added.

When the tokenized prompt is not a prefix of prompt + completion (tokens merging across the
boundary), both completions start where the shorter shared prefix ends, so chosen and rejected
always share the same prompt ids; `tokenize_pairs` warns how many pairs that happened to.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass

from preftune.data.schema import PreferencePair
from preftune.errors import UserError


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int = 0  # position in the loaded data set: the key of cached reference log-probs
    pair_id: str | None = None
    origin: str = ""  # "file.jsonl, line 12": names the row when a step goes non-finite

    @property
    def length(self) -> int:
        """Tokens of the longer of the two sequences (prompt + completion)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def num_tokens(self) -> int:
        """Tokens of both sequences, prompt counted twice: what the model actually processes."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_text(tokenizer, text: str) -> list[int]:
    """tokenizer(text) with its special tokens, but one BOS (EOS) where the text starts (ends)
    with its own and the tokenizer adds another."""
    ids = tokenizer(text)["input_ids"]
    bos, bos_text = tokenizer.bos_token_id, tokenizer.bos_token
    if (bos is not None and bos_text and ids[:2] == [bos, bos] and text.startswith(bos_text)
            and not text.startswith(bos_text * 2)):
        ids = ids[1:]
    eos, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    if (eos is not None and eos_text and len(ids) > 2 and ids[-2:] == [eos, eos] and text.endswith(eos_text)
            and not text.endswith(eos_text * 2)):
        ids = ids[:-1]
    return ids


def _less_appended_eos(tokenizer, ids: list[int], text: str) -> list[int]:
    """`ids` (of a text ending in `text`) less an EOS the tokenizer appends to every text
    (add_eos_token); an EOS the text itself ends with stays."""
    eos, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    if eos is not None and len(ids) > 1 and ids[-1] == eos and not (eos_text and text.endswith(eos_text)):
        return ids[:-1]
    return ids


def encode_prompt_text(tokenizer, prompt: str) -> list[int]:
    """`encode_text` less an appended EOS: a prompt is not over, and the sampler conditions on
    it without one (preftune.sampling)."""
    return _less_appended_eos(tokenizer, encode_text(tokenizer, prompt), prompt)


def _encode_chat(tokenizer, messages: list, generation_prompt: bool, origin: str = "",
                 template_kwargs: dict | None = None) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{origin or 'a conversational row'}: the row is conversational (message lists) but "
                        "the model's tokenizer has no chat template; use a model whose tokenizer has one, or "
                        "convert the rows to prompt/chosen/rejected text.")
    text = render_chat(tokenizer, messages, generation_prompt, origin or "a conversational row",
                       **(template_kwargs or {}))
    # The rendered template already holds its special tokens (BOS and the like).
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_chat(tokenizer, messages: list, generation_prompt: bool, where: str, **template_kwargs) -> str:
    """The chat template's text; a template that refuses the messages (a system turn Gemma does
    not take, turns that do not alternate) is one sentence naming `where`. `template_kwargs`:
    what else the template reads (a row's tools, see `chat_template_kwargs`)."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                             **template_kwargs)
    except TemplateError as e:
        roles = ", ".join(str(m.get("role")) for m in messages)
        raise UserError(f"{where}: the tokenizer's chat template refuses these messages (roles: {roles}): "
                        f"{e}; change the messages or use another chat template.") from None


def _ending_with(ids: list[int], eos: list[int]) -> list[int]:
    """The completion closed with EOS, unless its text (or the tokenizer) already closed it."""
    return ids if eos and ids[-len(eos):] == eos else ids + eos


def chat_template_kwargs(pair: PreferencePair) -> dict:
    """What a conversational row gives its chat template besides the messages, as TRL reads it: a
    `tools` column (a list of tool schemas, or JSON text of one) and a `chat_template_kwargs`
    mapping (enable_thinking, say). Left as metadata, a tool-use row trained on a prompt without
    the tools its responses call."""
    where = pair.origin or "a conversational row"
    tools = pair.metadata.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise UserError(f"{where}: field 'tools' is text but not JSON; give the list of tool schemas, "
                            "as a list or as JSON text.") from None
    extra = pair.metadata.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
        raise UserError(f"{where}: field 'chat_template_kwargs' must be an object of template arguments "
                        f"(e.g. {{\"enable_thinking\": false}}), got {type(extra).__name__}.")
    return {**({"tools": tools} if tools else {}), **extra}


def _encode_open_chat(tokenizer, prompt: list, completion: list, origin: str,
                      template_kwargs: dict | None = None) -> list[int]:
    """A conversation whose last (assistant) message was cut by max_new_tokens when sampled:
    the text the model continued (the template up to the generation prompt, then the message),
    without the end of turn the template would write and the model never did."""
    last = completion[-1]
    if last["role"] != "assistant":
        raise UserError(f"{origin or 'a conversational row'}: a response marked truncated must end with an "
                        f"assistant message, not {last['role']!r}; fix the row or drop the *_truncated key.")
    if not getattr(tokenizer, "chat_template", None):
        return _encode_chat(tokenizer, prompt, True, origin)  # the error for a missing template
    text = render_chat(tokenizer, prompt + completion[:-1], True, origin or "a conversational row",
                       **(template_kwargs or {}))
    # The rendered template already holds its special tokens (BOS and the like).
    return tokenizer(text + last["content"], add_special_tokens=False)["input_ids"]


def _truncated(pair: PreferencePair, name: str) -> bool:
    """Whether the row says its `name` response was cut when sampled (no EOS to train on)."""
    return pair.metadata.get(f"{name}_truncated") is True


def tokenize_pair(pair: PreferencePair, tokenizer, index: int = 0) -> TokenizedPair:
    return _tokenize_pair(pair, tokenizer, index)[0]


def _tokenize_pair(pair: PreferencePair, tokenizer, index: int) -> tuple[TokenizedPair, list[int]]:
    """The pair's ids, and the end of the tokenized prompt that prompt + completion does not
    share (tokens merging across the boundary, a template rendering the prompt differently)."""
    # A response cut by max_new_tokens when sampled (`*_truncated` in the row) is trained on
    # as the model wrote it: no EOS after it, and no end of turn from a chat template.
    chosen_cut, rejected_cut = _truncated(pair, "chosen"), _truncated(pair, "rejected")
    if pair.conversational:
        extra = chat_template_kwargs(pair)
        prompt_ids = _encode_chat(tokenizer, pair.prompt, True, pair.origin, extra)
        full_chosen = (_encode_open_chat(tokenizer, pair.prompt, pair.chosen, pair.origin, extra) if chosen_cut
                       else _encode_chat(tokenizer, pair.prompt + pair.chosen, False, pair.origin, extra))
        full_rejected = (_encode_open_chat(tokenizer, pair.prompt, pair.rejected, pair.origin, extra)
                         if rejected_cut
                         else _encode_chat(tokenizer, pair.prompt + pair.rejected, False, pair.origin, extra))
        eos: list[int] = []
    else:
        prompt_ids = encode_prompt_text(tokenizer, pair.prompt)
        full_chosen = encode_text(tokenizer, pair.prompt + pair.chosen)
        full_rejected = encode_text(tokenizer, pair.prompt + pair.rejected)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        # A tokenizer that closes every text with EOS (add_eos_token) closed a cut one too.
        full_chosen = _less_appended_eos(tokenizer, full_chosen, pair.chosen) if chosen_cut else full_chosen
        full_rejected = (_less_appended_eos(tokenizer, full_rejected, pair.rejected) if rejected_cut
                         else full_rejected)
    shared = min(
        _common_prefix_length(prompt_ids, full_chosen),
        _common_prefix_length(prompt_ids, full_rejected),
    )
    return TokenizedPair(
        prompt_ids=prompt_ids[:shared],
        chosen_ids=full_chosen[shared:] if chosen_cut else _ending_with(full_chosen[shared:], eos),
        rejected_ids=full_rejected[shared:] if rejected_cut else _ending_with(full_rejected[shared:], eos),
        index=index,
        pair_id=pair.pair_id,
        origin=pair.origin,
    ), prompt_ids[shared:]


def truncate_pair(
    pair: TokenizedPair, max_length: int | None, max_prompt_length: int | None, mode: str
) -> tuple[TokenizedPair | None, str | None]:
    """Fit a pair into `max_length` tokens per sequence: the prompt first, then the completions.

    Returns (pair, None) when it already fits, (pair, "truncated") when cut, and
    (None, reason) when the prompt alone leaves no room for a completion token, or when the cut
    leaves only a start the two completions share (CUT_TO_THE_SAME).
    """
    if max_length is None or pair.length <= max_length:
        return pair, None
    prompt = pair.prompt_ids
    if len(prompt) >= max_length:
        return None, "prompt longer than data.max_length"
    # The prompt gives up tokens first, but never below its budget (data.max_prompt_length,
    # or half of max_length), so a long completion cannot squeeze the context to nothing.
    budget = max_prompt_length if max_prompt_length is not None else max_length // 2
    overflow = pair.length - max_length
    keep = max(len(prompt) - overflow, min(len(prompt), budget))
    # keep_end keeps the prompt's last tokens (nearest the response); keep_start its first.
    prompt = prompt[len(prompt) - keep:] if mode == "keep_end" else prompt[:keep]
    room = max_length - len(prompt)
    chosen, rejected = pair.chosen_ids[:room], pair.rejected_ids[:room]
    if chosen == rejected:
        # One response twice, as a chosen == rejected row (skipped when read): a margin of 0, so
        # no gradient from DPO, and a wrong answer in rewards/accuracies however well trained.
        return None, CUT_TO_THE_SAME
    return TokenizedPair(prompt, chosen, rejected, pair.index, pair.pair_id, pair.origin), "truncated"


CUT_TO_THE_SAME = "chosen == rejected once cut to data.max_length"


def tokenize_pairs(pairs: list[PreferencePair], tokenizer, data_cfg) -> tuple[list[TokenizedPair], Counter]:
    """Tokenize and truncate a data set; the Counter says how many rows were cut or dropped."""
    kept, counts = [], Counter()
    diverged, example = 0, None
    for index, pair in enumerate(pairs):
        tokenized, cut = _tokenize_pair(pair, tokenizer, index)
        if cut:
            diverged += 1
            example = example or (pair.origin, tokenizer.decode(cut))
        if not tokenized.chosen_ids or not tokenized.rejected_ids:
            counts["empty completion after tokenization"] += 1
            continue
        tokenized, status = truncate_pair(
            tokenized, data_cfg.max_length, data_cfg.max_prompt_length, data_cfg.truncation
        )
        if status:
            counts[status] += 1
        if tokenized is not None:
            kept.append(tokenized)
    if diverged:
        # The pairs are kept (TRL's rule, and its warning): the prompt's end is trained on as
        # the start of both completions, a context the model does not see when it generates.
        warnings.warn(f"{diverged} of {len(pairs)} pairs: the tokenized prompt is not where prompt + "
                      "completion starts (tokens merging across the boundary, or a chat template "
                      f"rendering the prompt differently), so {example[1]!r} at the end of the prompt "
                      f"({example[0] or 'first such pair'}) counts as the start of the completions; end "
                      "prompts on a token boundary, e.g. no trailing space.", stacklevel=2)
    return kept, counts
