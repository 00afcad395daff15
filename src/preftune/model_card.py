"""The model card (README.md) beside the final policy's weights.

A model folder's README.md is the first thing people read of it, on the Hugging Face Hub and
off it: YAML metadata that the Hub indexes (base model, library, tags, data sets), then what the
model is, how it was trained and how well. preftune writes one into `final/` from the run's
config and metrics.jsonl, and `preftune export --merge` one into the merged folder, so that a
folder uploaded as it is (`hf upload`) explains itself. PEFT's own placeholder card, which its
`save_pretrained` writes beside an adapter, is replaced.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from preftune.records import read_records

CARD_NAME = "README.md"

# A hub id ("org/name" or "name"); a local folder is not one, and the Hub rejects it as base_model.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# Where the Hugging Face cache keeps a revision of a hub model: .../models--ORG--NAME/snapshots/COMMIT.
_CACHE_SNAPSHOT = re.compile(r"models--(?P<repo>[^/\\]+)[/\\]snapshots[/\\][0-9a-f]{40}[/\\]?$")

# Folder names preftune gives every run (final/, an export, a checkpoint): alone they say nothing.
_RUN_FOLDER = re.compile(r"^(final|merged(-step-\d+)?|step-\d+)$")

# An adapter trained from a local folder names it in adapter_config.json by its path on the
# trainer's machine: published as it is, it loads for no one else.
_LOCAL_BASE = (" Its `adapter_config.json` names that base by a folder on the machine that trained it; "
               "`preftune export RUN --base-id ORG/NAME` writes a copy naming the base's hub id, which loads "
               "anywhere.")

# Tags the Hub already uses for these methods; other loss types are tagged by their own name.
_LOSS_TAGS = {"sigmoid": "dpo", "sft": "sft"}

_DPO_CITATION = """\
@inproceedings{rafailov2023direct,
  title     = {Direct Preference Optimization: Your Language Model is Secretly a Reward Model},
  author    = {Rafailov, Rafael and Sharma, Archit and Mitchell, Eric and Manning, Christopher D.
               and Ermon, Stefano and Finn, Chelsea},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2023}
}"""


def hub_id(name: object) -> str | None:
    """`name` when it reads as a hub id and is not a local path, else None."""
    if not isinstance(name, str) or not _HUB_ID.match(name) or Path(name).exists():
        return None
    return name


def cached_hub_id(path: object) -> str | None:
    """The hub id of a model given as its folder in the Hugging Face cache, else None: that
    folder exists on this machine only, the id everywhere."""
    match = _CACHE_SNAPSHOT.search(path) if isinstance(path, str) else None
    return match.group("repo").replace("--", "/") if match else None


def model_card(config: dict, metrics: list[dict], *, adapter: bool, world_size: int | None,
               title: str = "DPO policy") -> str:
    """The card's text for a run whose config (as in its config.yaml) and metrics are given.

    adapter: the folder holds a PEFT adapter (library peft, loaded with its base), else full
    weights that `transformers` loads alone. world_size: the run's processes, None when unknown
    (an export reads the run's files, which do not keep it).
    """
    model, data, loss = config.get("model", {}), config.get("data", {}), config.get("loss", {})
    types = [loss.get("type", "sigmoid")] if isinstance(loss.get("type"), str) else list(loss.get("type") or [])
    metadata = {
        "library_name": "peft" if adapter else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["preftune", *dict.fromkeys(_LOSS_TAGS.get(t, t) for t in types), *(["lora"] if adapter else [])],
    }
    base_id = hub_id(model.get("path")) or cached_hub_id(model.get("path"))
    if base_id:
        metadata["base_model"] = base_id
    trains = [data.get("train")] if isinstance(data.get("train"), str) else list(data.get("train") or [])
    datasets = [name for name in trains if hub_id(name)]
    if datasets:
        metadata["datasets"] = datasets
    base = _model_name(model.get("path")) or "the starting model"
    sections = [
        f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---",
        f"# {title}\n\n`{base}` trained on preference pairs ({', '.join(f'`{t}`' for t in types)} "
        f"loss) with preftune, {_against(model, loss, types)}." + (" This folder holds LoRA adapters; their base is "
                                                                  f"`{base}`." if adapter else "")
        + (_LOCAL_BASE if adapter and not base_id else ""),
        "## Training\n\n" + _table(("setting", "value"), _settings(config, world_size)),
        _results(metrics),
        "## Use\n\n```python\n" + _usage(adapter) + "```",
        "## Citation\n\n```bibtex\n" + _DPO_CITATION + "\n```",
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def write_model_card(folder: Path, run_dir: Path, config: dict, *, adapter: bool,
                     world_size: int | None) -> Path:
    """Write `folder`/README.md for the run in `run_dir`."""
    path = Path(folder) / CARD_NAME
    path.write_text(model_card(config, run_metrics(run_dir), adapter=adapter, world_size=world_size,
                               title=Path(run_dir).name), encoding="utf-8")
    return path


def run_metrics(run_dir: Path) -> list[dict]:
    """The records of the run's metrics.jsonl; none when it has no such file."""
    path = Path(run_dir) / "metrics.jsonl"
    return read_records(path) if path.exists() else []


def _settings(config: dict, world_size: int | None) -> list[tuple[str, str]]:
    model, data, loss = config.get("model", {}), config.get("data", {}), config.get("loss", {})
    optim, train = config.get("optim", {}), config.get("train", {})
    types = loss.get("type", "sigmoid")
    rows = [
        ("data", ", ".join(f"`{_data_name(d)}`" for d in ([data.get("train")] if isinstance(data.get("train"), str)
                                                          else data.get("train") or []))),
        ("loss", f"{types if isinstance(types, str) else ' + '.join(types)}"
                 + (f", weights {loss['weights']}" if loss.get("weights") else "")),
        ("beta", loss.get("beta")),
        ("learning rate", f"{optim.get('lr')}, {optim.get('scheduler', 'constant')} schedule, "
                          f"warmup {optim.get('warmup_steps', 0)}"),
        ("optimizer", f"{optim.get('name', 'adamw')}, weight decay {optim.get('weight_decay', 0.0)}, "
                      f"gradient clipping {optim.get('max_grad_norm')}"),
        ("pairs per optimizer step", _pairs_per_step(train.get("batch_size", 1), train.get("grad_accum", 1),
                                                     world_size)),
        ("length", f"max_length {data.get('max_length')}, truncation {data.get('truncation', 'keep_end')}"),
        ("precision", f"weights {model.get('dtype', 'float32')}"
                      + (f", {model['autocast']} autocast" if model.get("autocast", "none") != "none" else "")),
        ("reference", _reference(model, loss)),
        ("seed", train.get("seed", 0)),
    ]
    lora = model.get("lora")
    if lora:
        rows.insert(1, ("LoRA", f"r {lora.get('r')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, "
                                f"modules {lora.get('target_modules')}"))
    return [(name, str(value)) for name, value in rows]


def _data_name(name: str) -> str:
    """A Hub data set by its id, a local file by its name alone: the same in final/'s card (the
    path as typed) and an export's (config.yaml's absolute path), and no folder of the uploader's
    machine on the Hub."""
    return hub_id(name) or Path(name).name


def _model_name(path: object) -> object:
    """A Hub model by its id, a local folder by its name (with the run's when the name is one
    preftune gives every run, as final/ or a checkpoint). The same in final/'s card (the path as
    typed) and an export's (config.yaml's absolute path); and a card published on the Hub names
    no folder of the uploader's machine, which its readers could not open anyway."""
    if not isinstance(path, str) or not path or hub_id(path):
        return path
    if repo_id := cached_hub_id(path):  # a snapshot folder's name is a commit hash, its id names the model
        return repo_id
    parts = Path(os.path.abspath(path)).parts
    keep = 1
    if _RUN_FOLDER.match(parts[-1]):
        keep = 3 if len(parts) > 3 and parts[-2] == "checkpoints" else 2
    return "/".join(parts[-keep:])


def _against(model: dict, loss: dict, types: list[str]) -> str:
    """How the loss used a reference: none for reference-free runs, whose card must not claim one."""
    from preftune.losses import REFERENCE_FREE

    if model.get("reference") == "none" or loss.get("reference_free") or all(t in REFERENCE_FREE for t in types):
        return "with no reference model in its loss"
    if model.get("reference_path"):
        return f"against the frozen reference `{_model_name(model['reference_path'])}`"
    return "against a frozen reference copy of the starting model"


def _reference(model: dict, loss: dict) -> str:
    if model.get("reference") == "none" or loss.get("reference_free"):
        return "none"  # no reference was loaded
    reference = _model_name(model.get("reference_path")) or f"the starting model ({model.get('reference', 'copy')})"
    sync = model.get("reference_sync")
    if sync:  # TR-DPO: the reference moved toward the policy during the run
        reference += f", moved toward the policy every {sync.get('every')} steps (alpha {sync.get('alpha')}, TR-DPO)"
    return reference


def _pairs_per_step(batch_size: int, grad_accum: int, world_size: int | None) -> str:
    per_process = f"{batch_size} per micro-batch x {grad_accum} accumulated"
    if world_size is None:
        return f"{batch_size * grad_accum} per process ({per_process})"
    processes = f"{world_size} process{'es' if world_size > 1 else ''}"
    return f"{batch_size * grad_accum * world_size} ({per_process} x {processes})"


def _results(metrics: list[dict]) -> str:
    """The last training step's metrics and the last evaluation's, as metrics.jsonl has them."""
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval/loss" in m]
    if not train:
        return ""
    keys = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
    rows = [(f"train/{key}" if key == "loss" else key, train[-1].get(key)) for key in keys]
    if evals:
        rows += [(f"eval/{key}", evals[-1].get(f"eval/{key}")) for key in keys]
    rows = [(name, f"{value:.4g}") for name, value in rows if isinstance(value, (int, float))]
    step = train[-1].get("step")
    eval_step = f"; evaluation at step {evals[-1].get('step')}" if evals else ""
    return (f"## Results\n\nLast training step ({step}){eval_step}; every step is in the run's "
            "metrics.jsonl.\n\n" + _table(("metric", "value"), rows))


def _usage(adapter: bool) -> str:
    if adapter:
        return ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")\n'
                'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n')
    return ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n'
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n')


def _table(header: tuple[str, str], rows: list[tuple[str, str]]) -> str:
    lines = [header, ("---", "---"), *rows]
    return "\n".join(f"| {_cell(k)} | {_cell(v)} |" for k, v in lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")  # a bar inside a cell would split the row
