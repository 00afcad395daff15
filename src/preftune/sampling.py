"""Batched sampling of response pairs from a causal LM: step 1 of the DPO loop.

For each prompt x the starting model pi_sft writes `n` responses (y1, y2, ...) that people or a
reward function then compare. Three properties matter more than speed here:

* Reproducible whatever the batching. Every response row draws its tokens from its own
  `torch.Generator`, seeded from (seed, prompt index, response number). A prompt's random
  numbers therefore do not depend on which other prompts share its batch, on the batch size, or
  on where a killed run was resumed; its tokens do, rarely, since the batch shape changes the
  logits by rounding (1 prompt in 2000 of a tiny float32 model between batch sizes 7 and 32), so
  only the same batch size is bit for bit. `transformers`' own sampling draws every row from one global stream,
  so we do the draw in a logits processor and let `generate` run greedily on its one-hot output;
  `generate` still does the batching, left padding, KV cache and stopping.
* Crash-safe and resumable. `sample_to_file` appends each finished batch with fsync
  (`preftune.records.append_records`); a rerun repairs a torn last line and continues after the
  last prompt written, so the file never holds a prompt twice.
* Policy and reference comparable. Evaluation calls `sample_pairs` on two in-memory models with
  the same prompts and seed: both then see the same random numbers (common random numbers),
  which lowers the variance of their difference.

Records follow docs/CONTRACTS.md (pairs.jsonl).
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from preftune.data.io import check_encodable, decode_text
from preftune.errors import UserError, unreadable_file
from preftune.records import (
    append_records,
    check_out_file,
    make_parent_folder,
    read_records,
    recorded_path,
)
from preftune.sampling_settings import SamplingSettings
from preftune.wording import counted

Prompt = str | list[dict]  # a text, or a conversation: [{"role": ..., "content": ...}, ...]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Prompts


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read prompts from JSONL (`{"prompt": text | [messages]}` per line), a .json list of such
    objects, or a .txt file.

    A .txt file holds one prompt per line; blank lines are skipped, with a warning that counts
    them (pair ids number the prompts, not the lines). Any malformed line raises a `UserError`
    that names the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a prompt file" if path.is_dir() else "prompt file not found"
        raise UserError(f"{path}: {what}; pass a .jsonl or .txt file of prompts.")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".txt"):
        raise UserError(
            f"{path}: unknown prompt file type {suffix!r}; use .jsonl ({{\"prompt\": ...}} per line) "
            "or .txt (one prompt per line)."
        )
    try:
        data = path.read_bytes()
    except OSError as e:  # no permission to read it: one sentence, not a traceback
        raise unreadable_file(path, e) from None
    # A byte-order mark that Windows editors add is dropped: it would start the first prompt.
    text = decode_text(data, path)
    if suffix == ".json" and text.lstrip().startswith("["):
        return _prompts_from_json_list(text, path)
    # Lines end at "\n" alone: str.splitlines() also breaks at U+2028, U+0085, form feeds and other
    # characters a prompt (or a JSON string) may hold raw, cutting one prompt in two.
    lines = [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")]
    prompts, blank = [], 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            blank += 1
            continue
        prompts.append(line if suffix == ".txt" else _parse_jsonl_prompt(line, path, lineno))
    if not prompts:
        raise UserError(f"{path}: holds no prompts.")
    if blank:  # ids stay prompt indices, as files sampled before this warning hold them
        warnings.warn(f"{path}: skipped {counted(blank, 'blank line')}; pair ids number the "
                      f"{len(prompts)} prompts, not the file's lines.")
    return prompts


def _prompts_from_json_list(text: str, path: Path) -> list[Prompt]:
    """A .json file holding one list of {"prompt": ...} objects (it was read line by line, its
    "[" refused as 'not valid JSON')."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); fix the file.") from None
    prompts = [_prompt_of(row, f"{path}, row {i}") for i, row in enumerate(rows)]
    if not prompts:
        raise UserError(f"{path}: holds no prompts.")
    return prompts


def _parse_jsonl_prompt(line: str, path: Path, lineno: int) -> Prompt:
    where = f"{path}, line {lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); fix or remove that line.") from None
    return _prompt_of(row, where)


def _prompt_of(row, where: str) -> Prompt:
    if not isinstance(row, dict) or "prompt" not in row:
        # Chat data often comes as {"messages": [...]} or a bare list of messages per line.
        messages = row.get("messages") if isinstance(row, dict) else row
        hint = (": put the messages to answer, ending with the user's turn, under \"prompt\""
                if isinstance(messages, list) and messages and all(_is_message(m) for m in messages) else "")
        raise UserError(f"{where}: expected an object with a \"prompt\" key{hint}.")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError(f"{where}: \"prompt\" is empty.")
        check_encodable(prompt, where, "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_message(m) for m in prompt):
        for i, message in enumerate(prompt):
            check_encodable(message["content"], where, f"prompt[{i}].content")
        return prompt
    raise UserError(
        f"{where}: \"prompt\" must be a string or a non-empty list of "
        "{\"role\": ..., \"content\": ...} messages with string values."
    )


def _is_message(m) -> bool:
    return (
        isinstance(m, dict)
        and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str)
    )


def render_prompt(tokenizer, prompt: Prompt, where: str = "a chat prompt") -> str:
    """A conversation goes through the chat template with its generation prompt; text is kept."""
    from preftune.data.tokenize import render_chat

    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{where} is a list of chat messages but the tokenizer has no chat template; "
            "use text prompts or a tokenizer that defines one."
        )
    return render_chat(tokenizer, prompt, True, where)


def encode_prompts(tokenizer, prompts: Sequence[Prompt],
                   indices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize and LEFT-pad prompts, so that every row's next token sits in the last column.

    Rendered chat prompts already hold their special tokens, so the tokenizer adds none to them.
    Text prompts get the tokenizer's special tokens as in training (`encode_text`: one BOS even
    when the text starts with its own), less an EOS the tokenizer appends: a prompt is not over.
    `indices` (the prompts' positions in their file) name a prompt the chat template refuses.
    Returns `input_ids` and `attention_mask`, both (B, T).
    """
    pad_id = _pad_token_id(tokenizer)
    indices = range(len(prompts)) if indices is None else indices
    ids = [prompt_ids(tokenizer, p, i) for i, p in zip(indices, prompts)]
    if any(len(row) == 0 for row in ids):
        raise UserError("a prompt tokenizes to no tokens; remove empty prompts.")
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)  # (B, T)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


def prompt_ids(tokenizer, prompt: Prompt, index: int) -> list[int]:
    """One prompt's ids, as `encode_prompts` lays them out; `index` names a prompt the chat
    template refuses."""
    if isinstance(prompt, str):
        return _encode_text_prompt(tokenizer, prompt)
    text = render_prompt(tokenizer, prompt, f"prompt {index} (counting from 0, as its pair id does)")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode_text_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt ids training uses too (less an EOS a tokenizer appends to every text)."""
    from preftune.data.tokenize import encode_prompt_text

    return encode_prompt_text(tokenizer, prompt)


def _pad_token_id(tokenizer) -> int:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UserError("the tokenizer has neither a pad token nor an EOS token; set one of them.")
    return pad_id


# ---------------------------------------------------------------------------------------------
# Generation


def row_seed(seed: int, prompt_index: int, response_index: int) -> int:
    """A 63-bit seed for one response row, a hash so that nearby indices give unrelated streams."""
    digest = hashlib.blake2b(f"{seed}/{prompt_index}/{response_index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


class _PerRowSampler:
    """A logits processor that samples each row with its own generator.

    It returns scores that are 0 at the drawn token and -inf elsewhere, so `generate` running
    greedily emits exactly the drawn token. It runs after the processors the model's generation
    config asks for (repetition penalty and the like), which therefore still apply.
    """

    def __init__(self, generators: list[torch.Generator], settings: SamplingSettings):
        self.generators = generators
        self.settings = settings

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()  # (R, V)
        s = self.settings
        if s.temperature == 0:
            choice = scores.argmax(dim=-1, keepdim=True)  # (R, 1)
        else:
            probs = filtered_probs(scores / s.temperature, s.top_k, s.top_p, s.min_p).cpu()  # (R, V)
            # Inverse-CDF draw: a tiny change in the logits moves the chosen token only when u
            # falls within that change of a bucket edge, so batching noise almost never shows.
            u = torch.cat([torch.rand(1, generator=g) for g in self.generators])  # (R,)
            cdf = probs.cumsum(dim=-1)  # (R, V)
            target = (u * cdf[:, -1]).unsqueeze(-1)  # (R, 1)
            choice = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)
            choice = choice.to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, choice, 0.0)


def filtered_probs(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0) -> torch.Tensor:
    """The distribution to draw from: softmax of `logits` (R, V), filtered and renormalised.

    top-k keeps the k likeliest tokens (and any tied with the k-th, as `transformers` does);
    top-p then takes the smallest set holding `top_p` of what top-k kept; min-p drops the
    tokens below `min_p` times the likeliest one's probability. The likeliest token always stays.
    """
    probs = torch.softmax(logits, dim=-1)  # (R, V)
    if not (0 < top_k < probs.shape[-1] or top_p < 1.0 or min_p > 0.0):
        return probs  # as it is: renormalising would move the draws of existing runs by rounding
    if 0 < top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]  # (R, 1)
        probs = probs.masked_fill(probs < kth, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    probs = _keep_nucleus(probs, top_p)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def nucleus_probs(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Softmax of `logits` (R, V) restricted to the smallest set of tokens with mass >= top_p."""
    return _keep_nucleus(torch.softmax(logits, dim=-1), top_p)


def _keep_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` (R, V), rows summing to 1, with the tokens outside the top-p nucleus at 0."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (R, V)
    sorted_probs[mass_before >= top_p] = 0.0  # the top token always stays (its mass_before is 0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


# Settings of a model's generation config that `generate` turns into logits processors even
# when it decodes greedily, as `generate_token_ids` runs it: each would reshape the distribution
# the sampler draws from (Qwen2.5-Instruct ships repetition_penalty 1.05), so samples would not
# come from the model, and a KL estimated from them would not be KL(pi || ref). Sampling resets
# them; each maps to the values that already mean "off".
MODEL_PROCESSOR_SETTINGS = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,), "sequence_bias": (None,), "min_length": (None, 0),
    "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
}


def set_aside_settings(generation_config) -> list[str]:
    """`name=value` for each setting of MODEL_PROCESSOR_SETTINGS that is on in the config."""
    changes = []
    for name, off in MODEL_PROCESSOR_SETTINGS.items():
        value = getattr(generation_config, name, None)
        if not any(value is o or value == o for o in off):
            changes.append(f"{name}={value}")
    return changes


# The model's suggested sampling knobs and what each is called in SamplingSettings and on the
# command line.
SUGGESTED_SAMPLING = {"temperature": ("temperature", "--temperature"), "top_k": ("top_k", "--top-k"),
                      "top_p": ("top_p", "--top-p"), "min_p": ("min_p", "--min-p")}


def unused_suggestions(generation_config, settings: SamplingSettings) -> list[str]:
    """`name=value` for each sampling knob the model's generation config sets (to other than the
    library's default) and sampling does not use. The defaults draw from the model's full
    distribution, as DPO's sampling and a KL estimate need; a chat model's card may suggest
    temperature 0.7, top-k 20 (Qwen2.5-Instruct), which a user may want, and should know is not
    what is used. A top-k of 0 and the library's unset value both mean off."""
    suggested = generation_config.to_diff_dict()
    unused = []
    for name, (field, _) in SUGGESTED_SAMPLING.items():
        value = suggested.get(name)
        if value is not None and value != getattr(settings, field):
            unused.append(f"{name}={value}")
    return unused


def _stop_token_ids(model, tokenizer) -> list[int]:
    """The model's generation-config EOS ids, and the tokenizer's EOS: training closes every text
    completion with the tokenizer's (preftune.data.tokenize), so a chat fine-tune whose tokenizer
    ends texts with <|im_end|> while its config.json still says <|endoftext|> has ended its
    response there, and what it writes after is no part of it."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    stops = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    for stop in (tokenizer.eos_token_id, _end_of_turn_id(tokenizer)):
        if stop is not None and stop not in stops:
            stops.append(stop)
    return stops


def _end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (<|im_end|>, <|eot_id|>,
    <end_of_turn>), or None. Training renders a chat completion with the template, so a model
    trained on it ends its answer there; a chat fine-tune of a base model (Qwen2.5, Llama 3) keeps
    the base's EOS in its tokenizer and config.json, and sampling ran on past its end of turn."""
    from preftune.data.tokenize import render_chat

    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "preftune-end-of-turn"
    try:
        text = render_chat(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}],
                           False, "the chat template")
    except Exception:  # a template that wants other turns: no stop of its own, as before
        return None
    after = text[text.rfind(marker) + len(marker):] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    token = tokenizer.added_tokens_decoder.get(ids[0]) if ids else None
    return ids[0] if token is not None and token.special else None


@torch.no_grad()
def generate_token_ids(
    model, tokenizer, prompts: Sequence[Prompt], prompt_indices: Sequence[int],
    settings: SamplingSettings,
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """The token ids `sample` and `eval generate` decode: each prompt's ids (unpadded), and per prompt
    `settings.n` rows of new ids, each cut just after its first stop token (kept, since the
    model chose it; a row that hit `max_new_tokens` has none).

    Evaluation scores these exact ids: re-tokenizing decoded text may merge tokens differently
    from what the model sampled, which would bias a KL estimate.
    """
    from transformers import LogitsProcessorList

    input_ids, attention_mask = encode_prompts(tokenizer, prompts, prompt_indices)  # (B, T)
    check_fits_context(model, attention_mask.sum(dim=1).tolist(), prompt_indices, settings.max_new_tokens)
    n = settings.n
    input_ids = input_ids.repeat_interleave(n, dim=0).to(model.device)  # (B*n, T)
    attention_mask = attention_mask.repeat_interleave(n, dim=0).to(model.device)  # (B*n, T)
    generators = [
        torch.Generator().manual_seed(row_seed(settings.seed, index, j))
        for index in prompt_indices for j in range(n)
    ]
    stop_ids = _stop_token_ids(model, tokenizer)
    config = copy.deepcopy(model.generation_config)  # the model's own stays untouched
    set_aside = set_aside_settings(config)
    # Warned from here, not the caller: this function runs inside torch.no_grad's wrapper, whose
    # file the CLI would print before the message (it prints preftune's own warnings as one line).
    if set_aside:  # said once per model and settings (warnings are shown once per message)
        warnings.warn(f"{getattr(model, 'name_or_path', 'the model')}: sampling sets aside "
                      f"{', '.join(set_aside)} from its generation config, so that responses "
                      "come from the model itself; only temperature, top-k, top-p and min-p shape "
                      "them.")
    unused = unused_suggestions(config, settings)
    if unused:
        options = ", ".join(f"{option} {getattr(settings, field)}" for field, option in SUGGESTED_SAMPLING.values())
        warnings.warn(f"{getattr(model, 'name_or_path', 'the model')}: its generation config suggests "
                      f"{', '.join(unused)}; sampling uses {options} as given (top-k 0 is off); to "
                      "sample as the model suggests, pass its values as these options.")
    # Greedy over the one-hot scores of _PerRowSampler; the sampling knobs live in the sampler.
    # use_cache: a config.json saved with "use_cache": false (training with gradient
    # checkpointing turns it off) and no generation_config.json made `generate` run every step
    # over the whole sequence again: the same tokens, at a cost growing with the square of the length.
    config.update(
        do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, use_cache=True,
        max_new_tokens=settings.max_new_tokens, min_new_tokens=None, max_length=None,
        pad_token_id=_pad_token_id(tokenizer), eos_token_id=stop_ids or None,
        **dict.fromkeys(MODEL_PROCESSOR_SETTINGS),
    )
    # `generate` fills every unset (None) value of the config it is given from the model's own
    # generation config, which would bring the settings just reset back: for the call, the
    # model's own is this one.
    own_config, model.generation_config = model.generation_config, config
    try:
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
            logits_processor=LogitsProcessorList(
                [_PerRowSampler(generators, settings)]
            ),
        )  # (B*n, T + new)
    finally:
        model.generation_config = own_config
    new_tokens = [_cut_after_stop(row, stop_ids) for row in output[:, input_ids.shape[1]:].tolist()]
    prompt_ids = [row[mask.bool()].tolist() for row, mask in zip(input_ids[::n], attention_mask[::n])]
    return prompt_ids, [new_tokens[i * n:(i + 1) * n] for i in range(len(prompts))]


def check_fits_context(model, prompt_lengths: Sequence[int], prompt_indices: Sequence[int],
                       max_new_tokens: int) -> None:
    """A prompt that with max_new_tokens runs past the model's positions is one sentence: a model
    with learned positions (GPT-2) failed halfway through sampling with an IndexError, and one
    with rotary positions writes past the lengths it was trained on."""
    from preftune.modeling import context_length, context_length_source

    limit = context_length(model)
    for index, length in zip(prompt_indices, prompt_lengths):
        if limit is not None and length + max_new_tokens > limit:
            raise UserError(
                f"prompt {index} (counting from 0, as its pair id does) is {length} tokens, so with "
                f"--max-new-tokens {max_new_tokens} it needs {length + max_new_tokens} positions, more "
                f"than the {limit} of {getattr(model, 'name_or_path', None) or 'the model'} "
                f"({context_length_source(model)}); shorten or drop that prompt, or lower "
                "--max-new-tokens.")


def check_all_fit_context(model, tokenizer, prompts: Sequence[Prompt], indices: Sequence[int],
                          max_new_tokens: int) -> None:
    """`check_fits_context` for every prompt to sample, before the first is sampled: checked
    batch by batch, a prompt too long for the model stopped a run of many prompts when its
    batch came, hours in, and named only that one; the next too long one stopped the rerun."""
    from preftune.modeling import context_length, context_length_source

    limit = context_length(model)
    if limit is None:
        return
    lengths = {i: len(prompt_ids(tokenizer, prompts[i], i)) for i in indices}
    too_long = [i for i, length in lengths.items() if length + max_new_tokens > limit]
    if len(too_long) == 1:  # the sentence a batch would give
        check_fits_context(model, [lengths[too_long[0]]], too_long, max_new_tokens)
    if too_long:
        shown = ", ".join(map(str, too_long[:10])) + (", ..." if len(too_long) > 10 else "")
        raise UserError(
            f"{len(too_long)} prompts (counting from 0, as pair ids do: {shown}) with --max-new-tokens "
            f"{max_new_tokens} need more than the {limit} positions of "
            f"{getattr(model, 'name_or_path', None) or 'the model'} ({context_length_source(model)}), "
            f"the longest needing {max(lengths[i] for i in too_long) + max_new_tokens}; shorten or drop those "
            "prompts, or lower --max-new-tokens.")


def _cut_after_stop(token_ids: list[int], stop_ids: list[int]) -> list[int]:
    stops = set(stop_ids)
    end = next((k + 1 for k, t in enumerate(token_ids) if t in stops), len(token_ids))
    return token_ids[:end]


def _decode_until_stop(tokenizer, token_ids: list[int], stop_ids: list[int],
                       prompt_ids: Sequence[int] = ()) -> str:
    """The response's text, up to its first stop token. Given its prompt's ids, the response is
    decoded after them: SentencePiece-style decoders (Llama 2, Mistral, Gemma) drop the space
    that opens a text ("▁Four" alone decodes to "Four"), so prompt + response would otherwise
    not be the text the model wrote, and training and the judge would see "Answer:Four"."""
    stops = set(stop_ids)
    end = next((k for k, t in enumerate(token_ids) if t in stops), len(token_ids))
    # No clean-up of spaces: prompt + response must re-tokenize to what the model wrote.
    options = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    text = tokenizer.decode(token_ids[:end], **options)
    if prompt_ids:
        head = tokenizer.decode(list(prompt_ids), **options)
        whole = tokenizer.decode(list(prompt_ids) + list(token_ids[:end]), **options)
        if whole.startswith(head):  # else a decoder that rewrites the prompt: the response alone
            text = whole[len(head):]
    return text


def pair_id(prompt_index: int, prefix: str = "p") -> str:
    """p000017 for prompt 17; another `prefix` keeps the ids of another batch of prompts apart
    when both go into one labeling database or one D.jsonl."""
    return f"{prefix}{prompt_index:06d}"


def iter_pair_batches(
    model, tokenizer, prompts: Sequence[Prompt], settings: SamplingSettings,
    batch_size: int = 16, start: int = 0, model_name: str | None = None, id_prefix: str = "p",
) -> Iterator[list[dict]]:
    """Yield pairs.jsonl records batch by batch for `prompts[start:]`.

    Batches are aligned to multiples of `batch_size` in prompt index, so a run resumed after a
    whole batch regroups prompts exactly as an uninterrupted run would.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
    model_name = model_name if model_name is not None else str(getattr(model, "name_or_path", ""))
    index = start
    while index < len(prompts):
        end = min(len(prompts), (index // batch_size + 1) * batch_size)
        indices = list(range(index, end))
        prompt_ids, rows = generate_token_ids(model, tokenizer, prompts[index:end], indices, settings)
        stop_ids = _stop_token_ids(model, tokenizer)
        yield [
            {
                "pair_id": pair_id(i, id_prefix), "prompt": prompts[i],
                "responses": [_decode_until_stop(tokenizer, ids, stop_ids, head) for ids in row],
                # Cut by max_new_tokens, not ended by the model: training must not close it
                # with an EOS the model never chose (see preftune.data.tokenize).
                "truncated": [not (ids and ids[-1] in stop_ids) for ids in row],
                "model": model_name, "sampling": settings.to_dict(),
            }
            for i, head, row in zip(indices, prompt_ids, rows)
        ]
        index = end


def sample_pairs(
    model, tokenizer, prompts: Sequence[Prompt], *, n: int = 2, temperature: float = 1.0,
    top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, max_new_tokens: int = 64,
    batch_size: int = 16, seed: int = 0, model_name: str | None = None,
) -> list[dict]:
    """Sample `n` responses per prompt from an in-memory model; returns pairs.jsonl records.

    The model keeps its mode and device; sampling runs under `torch.no_grad`. Prompt i is seeded
    from (seed, i), so two models sampled with the same prompts and seed share random numbers.
    """
    settings = SamplingSettings(temperature, top_p, max_new_tokens, seed, n, top_k=top_k, min_p=min_p)
    records = []
    for batch in iter_pair_batches(model, tokenizer, prompts, settings, batch_size, 0, model_name):
        records.extend(batch)
    return records


# ---------------------------------------------------------------------------------------------
# The `preftune sample` job: load, resume, append


def load_model_and_tokenizer(path: str, dtype: str = "float32", device: str = "auto",
                             setting: str = "--model"):
    """Load a causal LM and its tokenizer for generation, in eval mode on `device`; `setting`
    is the option that named `path`, for the sentence a missing folder gets."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.modeling import (
        adapter_base,
        check_local_folder,
        check_special_ids_fit,
        load_causal_lm,
        load_tokenizer,
        not_in_offline_cache,
        offline_error,
        pick_device,
    )

    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"--dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}.")
    device = pick_device(device, "--device")
    check_local_folder(path, setting)  # else transformers reads './missing' as a bad hub id
    if adapter_base(path) is not None:  # a PEFT adapter (a LoRA run's final/), on a base that may be one too
        model = load_causal_lm(path, dtype)
        return model.to(device).eval(), load_tokenizer(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype="auto" if dtype == "auto" else DTYPES[dtype]
        )
    except (OSError, ValueError) as e:  # no such folder, an unknown architecture, no usable tokenizer
        if not_in_offline_cache(path):
            raise offline_error(path, setting) from None
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot load a model and tokenizer from it ({reason}).") from None
    check_special_ids_fit(tokenizer, path)  # a pad id past the embeddings would fail in generate
    return model.to(device).eval(), tokenizer


def resume_position(
    out: Path, records: list[dict], prompts: Sequence[Prompt], settings: SamplingSettings,
    model_name: str, id_prefix: str = "p",
) -> int:
    """How many prompts `out` already holds, after checking it belongs to this very job."""
    model_names = {model_name, recorded_path(model_name)}
    if len(records) > len(prompts):
        raise UserError(
            f"{out} holds {len(records)} records but the prompt file only {len(prompts)}; "
            "choose another --out."
        )
    for i, record in enumerate(records):
        expected = (pair_id(i, id_prefix), prompts[i], settings.to_dict())
        found = tuple(record.get(k) for k in ("pair_id", "prompt", "sampling"))
        # The model as recorded (an absolute path for a local folder) or as typed (older files).
        if found != expected or record.get("model") not in model_names:
            raise UserError(
                f"{out}, line {i + 1}: written by another job (different prompts, model, "
                "sampling settings or --id-prefix); choose another --out or rerun with the same arguments."
            )
    return len(records)


def sample_to_file(
    model_path: str, prompts_path: str | Path, out: str | Path,
    settings: SamplingSettings = SamplingSettings(), batch_size: int = 16,
    dtype: str = "float32", device: str = "auto", progress: bool = True,
    on_batch: Callable[[int], None] | None = None, id_prefix: str = "p",
) -> tuple[int, int]:
    """Sample pairs for every prompt of `prompts_path` into `out`, resuming what is there.

    Returns (prompts already present, prompts written now). `on_batch(k)` is called after each
    batch of k prompts is safely on disk (tests use it to simulate a kill).
    """
    if batch_size < 1:  # here, not only when the first batch is drawn: after the model load and bar
        raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
    out = check_out_file(out, "pairs.jsonl", prompts_path, "--prompts file")
    prompts = load_prompts(prompts_path)
    if not id_prefix or not all(c.isalnum() or c in "-_." for c in id_prefix):
        raise UserError(f"--id-prefix {id_prefix!r}: use letters, digits, '-', '_' or '.' (e.g. batch2-).")
    done = resume_position(out, read_records(out, repair=True), prompts, settings, str(model_path), id_prefix)
    if done == len(prompts):
        return done, 0
    make_parent_folder(out)
    with _transformers_bars(progress):
        try:
            model, tokenizer = load_model_and_tokenizer(str(model_path), dtype, device)
        except torch.cuda.OutOfMemoryError:  # not the batch's fault: the CLI's advice for that would not help
            smaller = "pass --dtype bfloat16 (half the memory) or " if dtype == "float32" else ""
            raise UserError(f"{model_path}: out of GPU memory loading the model in {dtype}, before "
                            f"sampling anything; {smaller}use a GPU with more memory.") from None
    check_all_fit_context(model, tokenizer, prompts, range(done, len(prompts)), settings.max_new_tokens)
    batches = iter_pair_batches(
        model, tokenizer, prompts, settings, batch_size, start=done,
        model_name=recorded_path(model_path),  # the same folder from any directory reads the same
        id_prefix=id_prefix,
    )
    written = 0
    with _progress_bar(progress, total=len(prompts), completed=done) as advance:
        for batch in batches:
            written += append_records(out, batch)
            advance(len(batch))
            if on_batch is not None:
                on_batch(len(batch))
    return done, written


@contextmanager
def _progress_bar(enabled: bool, total: int, completed: int) -> Iterator[Callable[[int], None]]:
    """Yields `advance(k)` for a rich progress bar over prompts, or a no-op when disabled."""
    if not enabled:
        yield lambda k: None
        return
    from rich.progress import Progress

    with Progress() as progress:
        task = progress.add_task("sampling", total=total, completed=completed)
        yield lambda k: progress.advance(task, k)


@contextmanager
def _transformers_bars(enabled: bool) -> Iterator[None]:
    """transformers draws bars of its own ("Loading weights"); without progress, show none.

    The switch is global to transformers, so it is put back afterwards for other callers.
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
