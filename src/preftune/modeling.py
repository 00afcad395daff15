"""Loading the policy, its tokenizer and the frozen reference."""

from __future__ import annotations

import contextlib
import copy
import os

import torch
import torch.nn as nn

from preftune.errors import UserError
from preftune.logprobs import supports_hidden_state_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto", setting: str = "train.device") -> torch.device:
    """The device `name` names ("auto": this process's GPU if there is one, else the CPU),
    checked to exist here: a typo, or a GPU this machine or this torch build lacks, is one
    sentence naming `setting` rather than a traceback from the first tensor moved there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{setting} {name!r} is not a device name; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise UserError(f"{setting} {name!r}: this torch ({torch.__version__}, {build}) sees no CUDA "
                            "device; use auto or cpu.")
        if device.index is not None and device.index >= count:
            raise UserError(f"{setting} {name!r}: only {count} CUDA device(s) are visible (cuda:0 to "
                            f"cuda:{count - 1}; CUDA_VISIBLE_DEVICES renumbers them).")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None) or getattr(torch.backends, device.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise UserError(f"{setting} {name!r}: this torch ({torch.__version__}) has no usable "
                            f"{device.type} device; use auto or cpu.")
    return device


def autocast_context(autocast: str, device: torch.device):
    """A factory of the context a forward runs in: bf16 autocast for `model.autocast: bfloat16`
    (float32 master weights), else nothing."""
    if autocast == "bfloat16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _is_local(path: str) -> bool:
    return os.path.isdir(path) or path.startswith((".", "/", "~"))


_ANNOUNCED: set[str] = set()


def _announce_hub_lookup(path: str) -> None:
    """Say once, before it starts, that a name is going to the Hub: offline, huggingface_hub
    retries for the best part of a minute before it fails, and a mistyped local folder looks
    exactly like that."""
    import sys

    if os.path.isdir(os.path.expanduser(path)) or path in _ANNOUNCED or os.environ.get("HF_HUB_OFFLINE"):
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(path, "config.json"), str):
            return  # in the local cache: nothing to fetch
    except Exception:  # not a valid repo id: the loader's own error will say so
        return
    _ANNOUNCED.add(path)
    print(f"{path!r} is not a folder under {os.getcwd()}; looking it up on the Hugging Face Hub "
          "(HF_HUB_OFFLINE=1 makes that fail at once when offline).", file=sys.stderr)


def not_in_offline_cache(path: str) -> bool:
    """Whether `path` is a hub id that HF_HUB_OFFLINE=1 keeps from the Hub and the local cache
    lacks: then the loaders' 'couldn't connect to huggingface.co' hides what to do."""
    if os.path.isdir(os.path.expanduser(path)) or os.environ.get("HF_HUB_OFFLINE", "").upper() not in (
            "1", "ON", "YES", "TRUE"):
        return False
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(path, local_files_only=True)  # refs/main and its snapshot, nothing fetched
    except LocalEntryNotFoundError:
        return True
    except ValueError:  # not a valid repo id: the loader's own message says so
        return False
    return False


def offline_error(path: str, setting: str) -> UserError:
    from huggingface_hub import constants

    return UserError(f"{setting} {path!r} is not a folder under {os.getcwd()} and not in the Hugging Face "
                     f"cache {constants.HF_HUB_CACHE}, and HF_HUB_OFFLINE=1 keeps it from the Hub; download it "
                     f"into that cache first (hf download {path}) where there is network, or set {setting} "
                     "to a local model folder.")


def _load_error(what: str, path: str, error: Exception, setting: str) -> UserError:
    if not_in_offline_cache(path):
        return offline_error(path, setting)
    remote = "" if os.path.isdir(os.path.expanduser(path)) else \
        f" ({path!r} is not a folder under {os.getcwd()}, so it was looked up on the Hugging Face Hub)"
    return UserError(f"could not load {what} from {path!r}{remote}: {str(error).splitlines()[0][:200]}")


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


def check_local_folder(path: str, setting: str) -> None:
    """A path written as one ('/', '.', '~') that names no folder is a typo, not a hub id: say
    so, rather than pass it to the Hub and report its repo-id rules."""
    if _is_local(path) and not os.path.isdir(os.path.expanduser(path)):
        raise UserError(f"model folder {path} does not exist; check {setting}.")


def load_tokenizer(path: str, trust_remote_code: bool = False, setting: str = "model.path"):
    from transformers import AutoTokenizer

    check_local_folder(path, setting)
    base = adapter_base(path)
    if base is not None and not any(os.path.isfile(os.path.join(os.path.expanduser(path), name))
                                    for name in TOKENIZER_FILES):
        # An adapter saved without one: its base's, named in the adapter's config.
        return load_tokenizer(base, trust_remote_code,
                              setting=f"base_model_name_or_path in {os.path.join(path, ADAPTER_CONFIG)}")
    _announce_hub_lookup(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error("a tokenizer", path, e, setting) from None
    if tokenizer.pad_token_id is None:
        # Padding positions never count in a log-prob, so any id will do; EOS is the usual choice
        # (TRL's too). No token is added: the vocabulary stays the model's.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer at {path!r} has no EOS token; set one in its tokenizer_config.json.")
    check_special_ids_fit(tokenizer, path)
    return tokenizer


def check_special_ids_fit(tokenizer, path: str) -> None:
    """A pad token added to the tokenizer without resizing the model's embeddings (a common
    recipe, half done) would stop the first forward with an index error; say so at load."""
    import json

    while (base := adapter_base(path)) is not None:  # an adapter's vocabulary is its base model's
        path = base
    config_file = os.path.join(os.path.expanduser(path), "config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return  # a hub id, or a tokenizer without its model: nothing to compare with
    vocab_size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not isinstance(vocab_size, int):
        return
    for name in ("pad", "eos", "bos"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None and token_id >= vocab_size:
            raise UserError(f"the tokenizer at {path!r} has {name} token {getattr(tokenizer, f'{name}_token')!r} "
                            f"with id {token_id}, outside the model's {vocab_size}-token vocabulary (added "
                            "without resizing the embeddings); remove it from the tokenizer files, or resize the "
                            "model's embeddings with resize_token_embeddings and save it again.")


ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(path: str) -> str | None:
    """The base model of a PEFT adapter folder (a LoRA SFT, say), or None when `path` is not one.
    A base given relative to nothing (PEFT writes whatever name the model had) is read as written;
    a hub id with a `revision` (a commit) is that revision's folder in the hub cache, as PEFT's
    AutoPeftModelForCausalLM would load it (refused when the cache lacks it, see `_cached_revision`)."""
    import json

    config_file = os.path.join(os.path.expanduser(path), ADAPTER_CONFIG)
    if not os.path.isfile(config_file):
        return None
    try:
        with open(config_file, encoding="utf-8") as f:
            written = json.load(f)
        base, revision = written.get("base_model_name_or_path"), written.get("revision")
    except (OSError, ValueError, AttributeError):
        base = revision = None
    if not isinstance(base, str) or not base:
        raise UserError(f"{config_file}: no base_model_name_or_path, so the adapter's base model is unknown; "
                        "write the base model's folder or hub id there.")
    if isinstance(revision, str) and revision and not os.path.exists(os.path.expanduser(base)):
        return _cached_revision(base, revision, config_file)
    return base


def _cached_revision(repo_id: str, revision: str, config_file: str) -> str:
    """The hub cache's folder of `revision` of `repo_id`. Loading the hub id takes its main, so
    that is what a cache without the revision gets only for revision main; for another (a commit
    a LoRA run's final/ names) it is refused, not loaded on whatever main is now."""
    from huggingface_hub import try_to_load_from_cache

    for name in ("config.json", ADAPTER_CONFIG):
        try:
            found = try_to_load_from_cache(repo_id, name, revision=revision)
        except Exception:  # not a valid repo id: loading it says why
            return repo_id
        if isinstance(found, str):
            return os.path.dirname(found)
    if revision == "main":
        return repo_id
    raise UserError(f"{config_file} names revision {revision} of {repo_id} as the adapter's base, which is not "
                    f"in this machine's Hugging Face cache, and loading {repo_id} would take its main, maybe "
                    f"another model; download that revision first (hf download {repo_id} --revision {revision}), "
                    "then run this again.")


def load_causal_lm(path: str, dtype: str = "float32", attn_implementation: str | None = None,
                   trust_remote_code: bool = False, merge_adapter: bool = False,
                   setting: str = "model.path") -> nn.Module:
    """The model at `path`: a model folder, a hub id, or a PEFT adapter folder on either.

    An adapter is loaded onto its base (itself loaded this way, so a chain of adapters works);
    `merge_adapter` folds it into the base weights, as training needs: its starting point is
    plain weights, fully trainable or under new LoRA adapters. Otherwise it stays separate, so
    that low-precision weights do not round a small adapter away.
    """
    from transformers import AutoModelForCausalLM

    check_local_folder(path, setting)
    base = adapter_base(path)
    if base is not None:
        return _load_adapter(path, base, dtype, attn_implementation, trust_remote_code, merge_adapter)
    # "auto": the dtype the model's config.json names (as `preftune sample --dtype auto` asks).
    kwargs = {"dtype": "auto" if dtype == "auto" else DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    quiet_transformers()
    _announce_hub_lookup(path)
    source = os.path.expanduser(path)
    # A local folder by its absolute path: the model remembers it (config._name_or_path), and
    # PEFT writes it into every adapter_config.json as the base to load from any directory.
    source = os.path.abspath(source) if os.path.isdir(source) else source
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error("a causal LM", path, e, setting) from None
    # Which path its log-probs take (the chunked LM head or the model's own logits) is decided
    # now, on the whole model: not inside a training step (it reads a value from the device),
    # a torch.compile trace, or after FSDP has sharded it. Copies of the model keep the verdict.
    supports_hidden_state_path(model)
    return model


def _load_adapter(path: str, base_path: str, dtype: str, attn_implementation: str | None,
                  trust_remote_code: bool, merge: bool) -> nn.Module:
    from preftune.lora import peft_module

    peft = peft_module(f"the adapter folder {path}")
    folder = os.path.abspath(os.path.expanduser(path))
    try:
        model = load_causal_lm(base_path, dtype, attn_implementation, trust_remote_code, merge_adapter=True,
                               setting=f"base_model_name_or_path in {os.path.join(path, ADAPTER_CONFIG)}")
    except UserError as e:
        raise UserError(f"the PEFT adapter in {path} names {base_path!r} as its base model ({ADAPTER_CONFIG}'s "
                        f"base_model_name_or_path), which failed to load: {e}") from None
    try:
        if merge:
            model = peft.PeftModel.from_pretrained(model, folder).merge_and_unload()
            model.requires_grad_(True)  # PEFT froze the base for inference; a loaded model trains whole
            # Adapters trained on top record this folder as their base (PEFT reads name_or_path),
            # so loading them later brings this adapter back too.
            model.name_or_path = model.config._name_or_path = folder
        else:
            model.load_adapter(folder)  # what from_pretrained does with an adapter folder
    except (OSError, ValueError, RuntimeError, AttributeError, KeyError) as e:
        raise UserError(f"could not load the PEFT adapter in {path} onto its base {base_path!r}: "
                        f"{str(e).splitlines()[0][:200]}") from None
    if not merge:  # an adapter left separate may sit on the LM head: its log-prob path is decided again
        supports_hidden_state_path(model, recheck=True)
    return model


def quiet_transformers() -> None:
    """transformers draws a bar for every weight file it loads or writes; keep the console for
    our own progress and for messages that matter."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off in the policy, as in TRL's default: with it, the policy and the reference
    would disagree at step 0 by noise alone, and the loss would not start at ln 2."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward. transformers 5.24 renamed the method
    (the old name warns, and goes in v6); older 5.x releases have only the old one."""
    kwargs = {"use_reentrant": False}  # the re-entrant variant drops gradients of frozen inputs
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# RoPE scalings whose factor stretches the positions a model takes past its base length
# (max_position_embeddings, or rope_scaling's original_max_position_embeddings where given, as
# Qwen2.5's YaRN configs have it), as vLLM reads them. Llama 3.1's "llama3" and Phi-3's "longrope"
# already give the stretched length as max_position_embeddings.
STRETCHING_ROPE = ("linear", "dynamic", "yarn")


def context_length(model: nn.Module) -> int | None:
    """The positions a model takes: config.json's max_position_embeddings (GPT-2's n_positions
    reads as it too), times the factor of a rope_scaling that stretches them; None when its
    config names none."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    if not (isinstance(value, int) and value > 0):
        return None
    scaling = rope_stretch(config)
    return max(value, int(scaling[1] * scaling[2])) if scaling else value


def rope_stretch(config) -> tuple[str, float, int] | None:
    """(rope type, factor, base length) of a config whose rope_scaling (rope_parameters since
    transformers 5) stretches its positions; None for any other, and for one that sets RoPE per
    layer type (Gemma 3, whose max_position_embeddings is already the stretched length)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()) \
            or "gemma3" in str(getattr(config, "model_type", "")):  # its flat rope_scaling before transformers 5
        return None
    kind, factor = rope.get("rope_type", rope.get("type")), rope.get("factor")
    base = rope.get("original_max_position_embeddings") or config.max_position_embeddings
    if kind not in STRETCHING_ROPE or not isinstance(factor, (int, float)) or factor <= 1 or not isinstance(base, int):
        return None
    return kind, float(factor), base


def model_config(path: str):
    """The config.json of the model at `path` (an adapter's: its base's), read without the
    weights; None where it cannot be read (loading the model then says why)."""
    from transformers import AutoConfig

    while (base := adapter_base(path)) is not None:
        path = base
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(path))
    except (OSError, ValueError):
        return None


def context_length_source(model: nn.Module) -> str:
    """Where `context_length` comes from, for a message: the config key, or the stretch."""
    scaling = rope_stretch(getattr(model, "config", None))
    if scaling is None:
        return "max_position_embeddings in its config.json"
    kind, factor, base = scaling
    return f"{base} positions stretched {factor:g}x by the {kind} rope_scaling in its config.json"


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (dropout off), no gradients: the reference never changes."""
    model.eval()
    model.requires_grad_(False)
    return model


def check_reference_vocabulary(policy_path: str, reference_path: str, reference: nn.Module,
                               policy: nn.Module, trust_remote_code: bool = False,
                               setting: str = "model.reference_path") -> None:
    """The reference scores the policy's token ids, so both must share one tokenizer: another
    one stops the first step with an index error, or, with as many tokens, gives rewards that
    mean nothing. Said in one sentence before the first step."""
    what = f"the reference {reference_path!r} ({setting})"
    policy_tokenizer = load_tokenizer(policy_path, trust_remote_code)
    try:
        reference_tokenizer = load_tokenizer(reference_path, trust_remote_code)
    except UserError:
        reference_tokenizer = None  # weights without tokenizer files: the embeddings must still fit
    if reference_tokenizer is not None and reference_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        policy_vocab, reference_vocab = policy_tokenizer.get_vocab(), reference_tokenizer.get_vocab()
        differ = sorted(t for t in policy_vocab if reference_vocab.get(t) != policy_vocab[t])
        example = f", e.g. {differ[0]!r}" if differ else ""
        raise UserError(f"{what} has another tokenizer than the policy {policy_path!r} ({len(reference_vocab)} "
                        f"against {len(policy_vocab)} tokens{example}); DPO scores both models on the same token "
                        "ids, so use a reference with the policy's tokenizer (usually the model it starts from).")
    rows, policy_rows = (m.get_input_embeddings().num_embeddings for m in (reference, policy))
    if rows < policy_rows:
        raise UserError(f"{what} has {rows} token embeddings, fewer than the policy's {policy_rows}; use a "
                        "reference with the policy's tokenizer (usually the model it starts from).")


def make_reference(policy: nn.Module, model_cfg) -> nn.Module:
    """A frozen copy of the starting policy, or the model at `reference_path`."""
    if model_cfg.reference_path:
        reference = load_causal_lm(model_cfg.reference_path, model_cfg.dtype, model_cfg.attn_implementation,
                                   model_cfg.trust_remote_code, merge_adapter=True, setting="model.reference_path")
        check_reference_vocabulary(model_cfg.path, model_cfg.reference_path, reference, policy,
                                   model_cfg.trust_remote_code)
        reference.to(next(policy.parameters()).device)
    else:
        reference = copy.deepcopy(policy)
    return freeze(reference)
