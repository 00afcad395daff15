"""Reward functions r*(x, y) for `label auto` and `eval --judge` (see docs/CONTRACTS.md).

`load_reward(spec)` accepts
- `MODULE:FUNCTION`, importable from sys.path (the current folder is tried too);
- `path/to/file.py:FUNCTION`;
- a local folder holding a sequence classifier with one output (a reward model), applied to
  the prompt followed by the response, in batches, without gradients. A folder whose
  config.json (or tokenizer_config.json) maps it to its own Python code (`auto_map`, as ArmoRM
  does) is loaded only with `trust_remote_code=True`, the user's `--trust-remote-code`.

It always returns a `RewardFn(prompts, responses) -> list[float]`. A user function may be
written for one pair, `f(prompt, response) -> float`; it is then called pair by pair.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from preftune.errors import UserError

RewardFn = Callable[[Sequence, Sequence[str]], list]


# Texts a reward-model folder scores per forward pass unless asked otherwise (the
# --reward-batch-size of label auto and eval generate): small enough for a 7B reward model on
# one GPU with long texts.
REWARD_MODEL_BATCH_SIZE = 8


def load_reward(spec: str, batch_size: int = REWARD_MODEL_BATCH_SIZE, device: str | None = None,
                trust_remote_code: bool = False) -> RewardFn:
    """Resolve `spec` into a batched reward function; a bad spec is a `UserError`.
    `batch_size`: the texts a reward-model folder scores per forward pass (a function is called
    with whatever the caller passes). `trust_remote_code` lets a reward-model folder run the
    Python code it ships."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("the reward is empty; pass MODULE:FUNCTION, FILE.py:FUNCTION or a folder.")
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return _reward_model(folder, batch_size, device, trust_remote_code)
    target, sep, name = spec.rpartition(":")
    written_as_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
    if not sep and written_as_path:  # ./rm, ../rm, ~/rm, /models/rm: a folder mistyped or gone
        raise UserError(f"reward {spec!r}: no such folder; check the path to the reward model's folder.")
    if not sep and spec.count("/") == 1 and not spec.endswith(".py"):  # org/name, as on the Hub
        raise UserError(
            f"reward {spec!r} is not a folder here; a reward model is read from a local folder, "
            f"never downloaded: fetch it first (hf download {spec} --local-dir "
            f"DIR) and pass DIR."
        )
    if not sep or not target or not name:
        raise UserError(
            f"reward {spec!r} is neither a folder nor MODULE:FUNCTION; write it as "
            f"my_module:my_reward or path/to/file.py:my_reward."
        )
    module = _import_file(target, spec) if target.endswith(".py") else _import_module(target, spec)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"reward {spec!r}: {target} has no function named {name!r}.")
    _check_two_arguments(fn, spec)
    return _batched(fn, spec)


def _check_two_arguments(fn: Callable, spec: str) -> None:
    """A function that cannot be called with two arguments is one sentence now, not a TypeError
    traceback from inside the labeling loop."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: let the call tell
        return
    try:
        signature.bind(None, None)
    except TypeError:
        raise UserError(
            f"reward {spec!r} takes {signature}; it must take (prompt, response) or "
            f"(prompts, responses) and return a number or a list of them."
        ) from None


def _import_file(path: str, spec: str):
    file = Path(path)
    if not file.is_file():
        raise UserError(f"reward {spec!r}: the file {path} does not exist.")
    module_name = f"_preftune_reward_{abs(hash(str(file.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    module_spec.loader.exec_module(module)
    return module


def _import_module(name: str, spec: str):
    for _ in range(2):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            ours = e.name is not None and (name == e.name or name.startswith(e.name + "."))
            if not ours:
                raise  # the user's module exists but one of its own imports is missing
        if os.getcwd() in sys.path:
            break
        # A console script does not put the current folder on sys.path, but users expect
        # `--reward my_rewards:score` to find ./my_rewards.py as `python -m` would.
        sys.path.insert(0, os.getcwd())
    raise UserError(
        f"reward {spec!r}: no module named {name!r} on sys.path or in the current folder."
    )


def _is_per_pair(fn: Callable) -> bool | None:
    """True/False when annotations tell whether `fn` takes one pair or lists; None if unsure."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if len(params) < 2:
        return None
    annotation = params[1].annotation
    if annotation in (str, "str"):
        return True
    if annotation is inspect.Parameter.empty:
        return None
    return False


def _batched(fn: Callable, spec: str) -> RewardFn:
    """Adapt `fn` to the batched contract, deciding once how it wants to be called."""
    mode = {True: "pair", False: "batch", None: None}[_is_per_pair(fn)]

    def reward(prompts: Sequence, responses: Sequence[str]) -> list[float]:
        nonlocal mode
        if len(prompts) != len(responses):
            raise ValueError("prompts and responses must have the same length")
        if not prompts:
            return []
        if mode is None:
            # Unannotated: probe with a batch of one. A batched function answers with a list.
            try:
                probe = fn(list(prompts[:1]), list(responses[:1]))
            except (TypeError, AttributeError):  # a per-pair function choking on lists
                probe = None
            # A NumPy or torch scalar has a shape too, an empty one: one number, not a batch.
            batched = isinstance(probe, (list, tuple)) or len(getattr(probe, "shape", ())) > 0
            mode = "batch" if batched else "pair"
        if mode == "batch":
            values = list(fn(list(prompts), list(responses)))
        else:
            values = []
            for index, (p, r) in enumerate(zip(prompts, responses)):
                try:
                    values.append(fn(p, r))
                except Exception as e:  # the caller names the pair: a batch index alone tells nothing
                    raise RewardCallError(spec, index) from e
        return _as_floats(values, len(prompts), spec)

    return reward


class RewardCallError(Exception):
    """A per-pair reward function raised on one response: the one at `index` in the lists of
    that call. The function's own exception is the `__cause__`."""

    def __init__(self, spec: str, index: int):
        super().__init__(f"reward {spec!r} raised on response {index} of the call")
        self.index = index


def _as_floats(values: list, expected: int, spec: str) -> list[float]:
    if len(values) != expected:
        raise UserError(
            f"reward {spec!r} returned {len(values)} values for {expected} responses; "
            f"it must return one number per response."
        )
    out = []
    for value in values:
        try:
            out.append(float(value))
        except (TypeError, ValueError):
            raise UserError(
                f"reward {spec!r} returned {value!r}, which is not a number."
            ) from None
    return out


def render_text(tokenizer, prompt, response: str) -> str:
    """Prompt followed by response as one string; chat prompts go through the chat template."""
    if isinstance(prompt, str):
        return prompt + response
    messages = list(prompt) + [{"role": "assistant", "content": response}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


def reward_model_ids(tokenizer, prompt, response: str, max_length: int | None) -> list[int]:
    """The token ids a reward model scores: a chat rendered by the template holds its special
    tokens already (as `apply_chat_template(tokenize=True)` gives them), so the tokenizer adds
    none; a second BOS in front would put every score off the inputs the model was trained on.
    Text gets the tokenizer's own special tokens. Longer than `max_length` (None: no limit): cut
    on the tokenizer's `truncation_side`."""
    from preftune.data.tokenize import encode_text

    text = render_text(tokenizer, prompt, response)
    if isinstance(prompt, str) or not getattr(tokenizer, "chat_template", None):
        ids = encode_text(tokenizer, text)
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return _cut(tokenizer, ids, max_length)


def _cut(tokenizer, ids: list[int], max_length: int | None) -> list[int]:
    if max_length is None or len(ids) <= max_length:
        return ids
    return ids[-max_length:] if tokenizer.truncation_side == "left" else ids[:max_length]


def _custom_code(folder: Path) -> list[str]:
    """What the folder's config.json and tokenizer_config.json map to Python code of their own
    (`auto_map`), as "FILE: CLASS -> module.Class"; empty for a model transformers ships."""
    import json

    found = []
    for name, classes in (("config.json", ("AutoConfig", "AutoModelForSequenceClassification")),
                          ("tokenizer_config.json", ("AutoTokenizer",))):
        try:
            auto_map = json.loads((folder / name).read_text(encoding="utf-8")).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):  # missing or unreadable: loading will say
            continue
        if not isinstance(auto_map, dict):
            continue
        found += [f"{name}: {key} -> {auto_map[key]}" for key in classes if auto_map.get(key)]
    return found


def _reward_model(folder: Path, batch_size: int, device: str | None,
                  trust_remote_code: bool = False) -> RewardFn:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    custom = _custom_code(folder)
    if custom and not trust_remote_code:
        # Refused here, not left to transformers: for a known model_type (ArmoRM's is llama) it
        # would quietly build the stock classifier instead, whose head the weights do not fill,
        # and score with random numbers; for an unknown one it would ask on stdin.
        raise UserError(
            f"reward {folder}: the model runs on Python code that ships in that folder "
            f"({'; '.join(custom)}); add --trust-remote-code if you trust that code."
        )
    try:
        # In the dtype its config.json names (bfloat16 for most published reward models), on
        # every transformers version: 4.x would load float32, twice the memory, by default.
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, dtype="auto", trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(
            f"reward {folder}: not a loadable sequence classifier ({str(e).splitlines()[0]})."
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # weights saved without tokenizer.save_pretrained
        raise UserError(
            f"reward {folder}: the classifier loads but no tokenizer does ({str(e).splitlines()[0]}); "
            f"save the reward model's tokenizer in that folder too."
        ) from None
    if model.config.num_labels != 1:
        raise UserError(
            f"reward {folder}: the classifier has {model.config.num_labels} outputs; a reward "
            f"model must have exactly one (num_labels=1)."
        )
    if tokenizer.pad_token is None:
        # The head scores the last token that is not padding: the model's own pad id keeps that
        # the token it was trained to score (an EOS closing the text, say); EOS as padding would
        # move the score to the token before a closing EOS.
        own = model.config.pad_token_id
        if isinstance(own, int) and 0 <= own < len(tokenizer) and own != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(own)
        else:
            tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    from preftune.modeling import pick_device

    device = pick_device(device or "auto", "--device")
    model.to(device).eval()
    max_length = getattr(model.config, "max_position_embeddings", None) or 2048

    @torch.inference_mode()
    def reward(prompts: Sequence, responses: Sequence[str]) -> list[float]:
        rows = [reward_model_ids(tokenizer, p, r, None) for p, r in zip(prompts, responses)]
        # A cut text is scored without its end (or start): callers say how many were cut.
        reward.truncated += sum(len(row) > max_length for row in rows)
        rows = [_cut(tokenizer, row, max_length) for row in rows]
        values: list[float] = []
        for start in range(0, len(rows), batch_size):
            batch = tokenizer.pad({"input_ids": rows[start:start + batch_size]}, return_tensors="pt").to(device)
            scores = model(**batch).logits[:, 0]  # (B,)
            values.extend(scores.float().cpu().tolist())
        return values

    reward.truncated = 0  # texts longer than max_length so far, scored as cut
    reward.max_length = max_length
    return reward
