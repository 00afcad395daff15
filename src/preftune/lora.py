"""LoRA through PEFT: adapters on the policy, the base weights frozen and shared with the reference.

With `model.lora`, the policy is a `peft.PeftModel`; the reference is the same model with its
adapters disabled (reference.AdapterDisabledReference), so no second copy of the weights
exists. Checkpoints and final/ hold the adapter (adapter_config.json +
adapter_model.safetensors, loadable by `peft.PeftModel.from_pretrained`); `preftune export RUN
--merge` folds it into the base weights.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from torch import nn

from preftune.errors import UserError


def peft_module(needed_by: str = "model.lora"):
    try:
        import peft
    except ModuleNotFoundError:
        raise UserError(f"{needed_by} needs the peft package: pip install 'preftune[lora]'.") from None
    # PEFT reads an attribute that transformers 5 renamed; the warning is neither ours nor the user's.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # Saving an adapter, PEFT looks for the base's config.json to see if its vocabulary grew; a
    # base that is itself an adapter folder has none. preftune never resizes the vocabulary.
    warnings.filterwarnings("ignore", message="Could not find a config file in", category=UserWarning)
    return peft


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def apply_lora(model: nn.Module, lora_cfg) -> nn.Module:
    """Wrap `model` with fresh LoRA adapters (B = 0, so the policy starts equal to the base)."""
    peft = peft_module()
    config = peft.LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                             target_modules=lora_cfg.target_modules, task_type="CAUSAL_LM")
    try:
        model = peft.get_peft_model(model, config)
    except ValueError as e:
        raise UserError(f"model.lora.target_modules: {str(e).splitlines()[0][:200]}") from None
    if isinstance(lora_cfg.target_modules, list):
        # PEFT refuses a list none of whose names match, but passes over each one that does not
        # (a typo beside good names), which would silently leave those layers untrained.
        targeted = model.targeted_module_names
        missing = [name for name in lora_cfg.target_modules
                   if not any(t == name or t.endswith("." + name) for t in targeted)]
        if missing:
            raise UserError(f"model.lora.target_modules: {', '.join(map(repr, missing))} names no module of "
                            f"the model (the other names matched {len(targeted)}); fix or remove it.")
    return model


def load_adapter_weights(model: nn.Module, folder: Path) -> None:
    """Load a saved adapter (checkpoint or final/) into an already-wrapped PEFT model."""
    from safetensors.torch import load_file

    path = Path(folder) / "adapter_model.safetensors"
    if not path.exists():
        raise UserError(f"checkpoint {folder} holds no adapter_model.safetensors, but model.lora is set; "
                        "resume with the config the run was started with.")
    result = peft_module().set_peft_model_state_dict(model, load_file(str(path)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"checkpoint {folder}: the adapter does not match model.lora "
                        f"(unexpected {unexpected[:3]}).")


def name_cached_base_by_hub_id(folder: Path) -> None:
    """An adapter whose base was loaded from its hub cache folder (.../models--ORG--NAME/
    snapshots/COMMIT), which PEFT names in adapter_config.json by that absolute path, found on
    this machine only, names it by its hub id and commit instead: AutoPeftModelForCausalLM loads
    that revision anywhere, and preftune the same snapshot from the cache (modeling.adapter_base)."""
    from preftune.model_card import cached_hub_id
    from preftune.modeling import ADAPTER_CONFIG

    path = Path(folder) / ADAPTER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    repo_id = cached_hub_id(base)
    if repo_id is not None:
        config.update(base_model_name_or_path=repo_id, revision=Path(base).name)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def local_base_note(folder: Path, run: Path) -> str | None:
    """For an adapter whose adapter_config.json names its base by a local folder, which loads on
    this machine only: the command that writes a copy naming the base's hub id, for publishing."""
    from preftune.model_card import hub_id
    from preftune.modeling import ADAPTER_CONFIG

    path = Path(folder) / ADAPTER_CONFIG
    base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not isinstance(base, str) or hub_id(base):
        return None
    return (f"{path} names its base by the local folder {base}, which loads on this machine only; to publish "
            f"the adapter, `preftune export {run} --base-id ORG/NAME` writes a copy naming the base's hub id "
            "(or --merge, a model that needs no base).")


def merge_adapter(adapter_folder: Path, base_path: str, dtype: str, out: Path,
                  extra_files: dict[str, str] | None = None, setting: str = "model.path") -> Path:
    """Base model + adapter -> one model folder that `from_pretrained` loads without peft,
    written whole or not at all (an earlier folder at `out` is replaced only at the end)."""
    from preftune.checkpoint import write_folder_atomically
    from preftune.modeling import load_causal_lm, load_tokenizer

    # A base that is itself an adapter (a LoRA SFT) is folded in first, as training did: left
    # attached, transformers would save only its adapter weights in place of the merged model.
    base = load_causal_lm(base_path, dtype, merge_adapter=True, setting=setting)
    model = peft_module().PeftModel.from_pretrained(base, str(adapter_folder))
    merged = model.merge_and_unload()
    tokenizer_source = adapter_folder if (adapter_folder / "tokenizer_config.json").exists() else base_path
    tokenizer = load_tokenizer(str(tokenizer_source))

    def fill(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")

    return write_folder_atomically(out, fill, "the merged model",
                                   then="any earlier export there is intact; free some space and run the export again")
