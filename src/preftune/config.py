"""One typed schema for every key preftune reads, with its default.

A config is a YAML file plus `key=value` overrides (`optim.lr=5e-7 loss.type=[sigmoid,sft]`).
Unknown keys and bad values fail with one sentence that names the dotted key.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from preftune.errors import UserError
from preftune.loss_names import BATCH_WIDE, F_DIVERGENCE_LOSSES, LOSS_NAMES, PARAMETER_USERS


class Section(BaseModel):
    # Typos must fail loudly: a silently ignored `optim.learning_rate` costs a whole run.
    # A NaN or infinite number is always a typo or junk (`lr: .nan`), never a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _scalar_of_the_keys_kind(cls, value, info):
        members = get_args(cls.model_fields[info.field_name].annotation) or \
            (cls.model_fields[info.field_name].annotation,)
        # YAML reads yes/no/true/false/on/off as booleans, and pydantic took them for 1 and 0:
        # `save_every: yes` saved after every step, `eval_every: true` evaluated after every one.
        if isinstance(value, bool) and all(member in (int, float, type(None)) for member in members):
            none = ", or null for none" if type(None) in members else ""
            raise ValueError(f"{str(value).lower()} is not a number; give a number{none}")
        # Likewise in a list of numbers: `loss.weights: [true]` was a weight of 1.0, and
        # `optim.betas: [false, 0.99]` a beta1 of 0.
        items = _item_types(cls.model_fields[info.field_name].annotation)
        if isinstance(value, (list, tuple)) and items and all(item in (int, float) for item in items):
            for number, item in enumerate(value, 1):
                if isinstance(item, bool):
                    raise ValueError(f"entry {number}, {str(item).lower()}, is not a number; give a number "
                                     "for each entry")
        # And it reads `output_dir: 20241129` as a number, which was only "Input should be a valid string".
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _text_only(members):
            raise _NumberForText(value)
        return value


class _NumberForText(ValueError):
    """A name that YAML read as a number. The number is not always what was written (1e3 reads as
    1000.0, 017 as 15): validate_config shows the text written, where it has the YAML source."""

    def __init__(self, value):
        super().__init__(f"read as the number {value}; put it in quotes, as written, to give it as text")


def _item_types(annotation) -> tuple:
    """The types of a list key's entries (float for loss.weights, float and float for optim.betas);
    () for a key that takes no list."""
    lists = [member for member in (annotation, *get_args(annotation)) if get_origin(member) in (list, tuple)]
    return tuple(item for member in lists for item in get_args(member))


def _text_only(members) -> bool:
    """Whether a key of these types takes text and nothing else (or null)."""
    return str in members and all(member in (str, type(None)) for member in members)


def _takes_text_only(path: list[str]) -> bool:
    """Whether the config key at `path` (["train", "output_dir"]) takes text and nothing else."""
    model: type[BaseModel] = Config
    for depth, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        members = get_args(field.annotation) or (field.annotation,)
        if depth == len(path) - 1:
            return _text_only(members)
        sections = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if not sections:
            return False
        model = sections[0]
    return False


class LoraConfig(Section):
    r: int = Field(16, gt=0)
    alpha: float = 32.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"


class ReferenceSyncConfig(Section):
    """TR-DPO (Gorbatovski et al. 2024): after every `every` optimizer steps the reference becomes
    alpha * policy + (1 - alpha) * reference; alpha = 1 replaces it with the policy. TRL's
    ref_model_sync_steps (512) and ref_model_mixup_alpha (0.6)."""
    every: int = Field(512, gt=0)
    alpha: float = Field(0.6, gt=0.0, le=1.0)


class ModelConfig(Section):
    path: str
    reference_path: str | None = None
    # copy: a frozen copy of the starting policy (or of reference_path);
    # precompute: one no-grad pass over the data before training, log-probs cached on disk;
    # none: reference-free losses only (simpo, sft).
    reference: Literal["copy", "precompute", "none"] = "copy"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Mixed precision: float32 master weights, forward under bf16 autocast (on CPU too, as TRL does).
    autocast: Literal["none", "bfloat16"] = "none"
    gradient_checkpointing: bool = False
    disable_dropout: bool = True
    compile: bool = False
    # torch.compile's mode: "reduce-overhead" also records CUDA graphs, one per distinct batch
    # shape (so it suits fixed-length batches), which removes the per-kernel launch cost that
    # bounds small models on fast GPUs; "max-autotune" searches kernel configurations.
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    lora: LoraConfig | None = None
    # TR-DPO: the frozen copy (model.reference: copy) moves toward the policy during training.
    reference_sync: ReferenceSyncConfig | None = None

    @field_validator("lora", "reference_sync", mode="before")
    @classmethod
    def _switched_on_or_off(cls, value):
        # TRL's use_peft / sync_ref_model are switches: `model.lora: true` was "Input should be a
        # valid dictionary"; true is the section with its defaults, false none.
        if isinstance(value, bool):
            return {} if value else None
        return value

    @field_validator("path", "reference_path")
    @classmethod
    def _names_a_model(cls, value):
        # '' went to the Hub as a repo id (path) or silently meant no reference (reference_path).
        if value is not None and not value.strip():
            raise ValueError("an empty name; give a model folder or hub id")
        return _home_expanded(value)


def _home_expanded(path: str | None) -> str | None:
    """A path as the shell would read it: YAML and `key=value` overrides keep a leading ~ as it
    is, and train.output_dir: ~/runs/dpo made a folder named '~' in the current one. A hub id
    never starts with ~, so it passes unchanged."""
    return os.path.expanduser(path) if path else path


class DataConfig(Section):
    train: str | list[str]
    eval: str | list[str] | None = None
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    # What eval_fraction draws: rows (pair), or distinct prompts held out with all their pairs
    # (prompt), so that data with several pairs per prompt has no prompt on both sides.
    eval_fraction_by: Literal["pair", "prompt"] = "pair"
    split: str = "train"  # the split to read when `train` is a hub id or a DatasetDict folder
    # The split to read for `eval` (default: `split`, where `eval` has splits; an eval file is
    # read whole): UltraFeedback's test_prefs, say, when `eval` names the same data set as `train`.
    eval_split: str | None = None
    # The config (subset) to read when `train` is a hub id or data folder whose README.md declares
    # several (load_dataset's `name`, TRL's dataset_config); eval_config is `eval`'s.
    config: str | None = None
    eval_config: str | None = None
    max_length: int | None = Field(1024, gt=1)
    max_prompt_length: int | None = Field(None, gt=0)
    truncation: Literal["keep_end", "keep_start"] = "keep_end"
    # Sort pairs into length-grouped batches so little compute goes to padding.
    group_by_length: bool = True
    # Pack a micro-batch's sequences into one row with restarted position ids, when a check at
    # start-up shows the model keeps them apart (preftune/packing.py). "auto" packs only with a
    # variable-length kernel (flash-attention), where it is faster; "on" also with sdpa/eager.
    packing: Literal["auto", "on", "off"] = "auto"
    # Run each pair's prompt through the model once, not once per response (exact; checked at
    # start-up; off under gradient checkpointing, compile and fsdp). It saves compute but runs
    # the decoder twice per forward, twice the kernel launches: "auto" shares on CPU, where
    # compute is the cost, and not on GPUs, where a step is often bound by launches
    # (bench/host_ops.py counts them).
    share_prompt: bool | Literal["auto"] = "auto"

    @field_validator("train", "eval")
    @classmethod
    def _names_a_source(cls, value, info):
        # An empty name would be read as the current folder, and an empty list as no data at all.
        if value == [] and info.field_name == "train":
            raise ValueError("an empty list; name at least one data file, folder or hub id")
        names = value if isinstance(value, list) else [value]
        if any(name is not None and not name.strip() for name in names):
            raise ValueError("an empty name; give a data file, folder or hub id")
        return [_home_expanded(name) for name in value] if isinstance(value, list) else _home_expanded(value)

    @field_validator("packing", mode="before")
    @classmethod
    def _packing_from_yaml_boolean(cls, value):
        # YAML 1.1 reads an unquoted `on` / `off` (the documented values) as true / false.
        if isinstance(value, bool):
            return "on" if value else "off"
        return value

    @model_validator(mode="after")
    def _eval_is_not_the_training_data(self):
        def as_list(sources):
            return [sources] if isinstance(sources, str) else list(sources or [])

        if (self.eval_split or self.split) != self.split or self.eval_config != self.config:
            return self
        if as_list(self.eval) and as_list(self.eval) == as_list(self.train):
            raise ValueError(
                f"data.eval names the same data as data.train, and the same split ({self.split!r}), "
                "so evaluation would run on training pairs; set data.eval_split (e.g. test), or "
                "remove data.eval and hold out data.eval_fraction instead"
            )
        if shared := [name for name in as_list(self.eval) if name in as_list(self.train)]:
            raise ValueError(
                f"data.eval names {shared[0]!r}, which data.train names too, with the same split "
                f"({self.split!r}), so evaluation would run on its training pairs; give data.eval_split "
                "(e.g. test) and data.eval only sources that have that split, or leave it out of data.eval"
            )
        return self

    @model_validator(mode="after")
    def _prompt_budget_needs_a_length(self):
        # The prompt's floor when a sequence is cut to max_length; with no max_length nothing is cut.
        if self.max_prompt_length is not None and self.max_length is None:
            raise ValueError(
                "data.max_prompt_length is set, but data.max_length is null, so nothing is truncated and "
                "it has no effect; set data.max_length, or remove data.max_prompt_length"
            )
        return self

    @model_validator(mode="after")
    def _eval_split_needs_eval_data(self):
        # Without data.eval it would read nothing: no evaluation, and no word about it.
        if self.eval_split is not None and not self.eval:
            raise ValueError(
                f"data.eval_split is {self.eval_split!r}, but data.eval is not set, so no split is read "
                "for evaluation; set data.eval to the data set holding that split (the same as data.train "
                "for its held-out split), or remove data.eval_split"
            )
        if self.eval_config is not None and not self.eval:
            raise ValueError(
                f"data.eval_config is {self.eval_config!r}, but data.eval is not set, so no config is read "
                "for evaluation; set data.eval to the data set holding that config, or remove data.eval_config"
            )
        return self

    @model_validator(mode="after")
    def _one_source_of_eval_pairs(self):
        if self.eval is not None and self.eval_fraction > 0:
            raise ValueError(
                "data.eval and data.eval_fraction are both set; keep data.eval to evaluate on its "
                "pairs, or remove it to hold out data.eval_fraction of the training pairs"
            )
        return self

    @model_validator(mode="after")
    def _eval_fraction_by_prompt_needs_a_fraction(self):
        if self.eval_fraction_by == "pair":
            return self
        if self.eval is not None:
            raise ValueError(
                "data.eval_fraction_by: prompt holds out prompts of data.train, but data.eval gives the "
                "eval pairs; remove data.eval_fraction_by, or remove data.eval and set data.eval_fraction"
            )
        if self.eval_fraction == 0:
            raise ValueError(
                "data.eval_fraction_by: prompt holds out a share of the prompts, but data.eval_fraction "
                "is 0; set data.eval_fraction (e.g. 0.05), or remove data.eval_fraction_by"
            )
        return self


class LossConfig(Section):
    type: str | list[str] = "sigmoid"
    weights: list[float] | None = None
    beta: float = Field(0.1, gt=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    reference_free: bool = False
    ipo_length_normalize: bool = True
    simpo_gamma: float = 0.5
    rdpo_alpha: float = 0.01
    discopop_tau: float = Field(0.05, gt=0.0)
    # f-DPO (Wang et al. 2023): the divergence that keeps the policy near the reference.
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
    # TRL's coefficient, 1 - alpha of the f-DPO paper: 0 is forward KL, 1 reverse KL.
    f_alpha_divergence_coef: float = Field(0.5, ge=0.0, le=1.0)
    # bco_pair's reward shift delta: running_mean is BCO's (the mean implicit reward of the steps
    # so far); none is delta = 0, TRL 1.16's bco_pair.
    bco_reward_shift: Literal["running_mean", "none"] = "running_mean"
    # LD-DPO (Liu et al. 2024): each response's log-prob sums its first l_p = min(|y_w|, |y_l|)
    # tokens plus ld_alpha times the rest, for policy and reference; None is plain DPO (= 1.0).
    ld_alpha: float | None = Field(None, ge=0.0, le=1.0)
    # WPO (Zhou et al. 2024): each pair's loss times the policy's own weights w(y_w) * w(y_l).
    wpo_weighting: bool = False

    @field_validator("type")
    @classmethod
    def _known_types(cls, value):
        if value == []:  # no loss at all: the first backward would fail with a traceback
            raise ValueError(f"an empty list; name one or more of {', '.join(sorted(LOSS_NAMES))}")
        names = [value] if isinstance(value, str) else value
        for name in names:
            if name not in LOSS_NAMES:
                raise ValueError(f"unknown loss {name!r}; choose from {', '.join(sorted(LOSS_NAMES))}")
        if repeated := sorted({name for name in names if names.count(name) > 1}):
            # Summed twice it is one type at a larger weight, which loss.weights says plainly.
            raise ValueError(f"{', '.join(repeated)}: listed more than once; give each type once and put "
                             "the sum of its weights in its loss.weights entry")
        return value

    @field_validator("weights")
    @classmethod
    def _no_negative_weight(cls, value):
        # A negative weight turns that loss into one to maximise: with sigmoid, gradient ascent
        # that teaches the policy to prefer the rejected responses. TRL's recipes (RPO, MPO) use none.
        if value is not None and (negative := [w for w in value if w < 0]):
            raise ValueError(f"{negative[0]:g} is negative, and a negative weight maximises that loss "
                             "(for a preference loss, training towards the rejected responses); use 0 or more")
        if value and not any(value):  # every loss times 0: the run would train nothing, at full cost
            raise ValueError("every weight is 0, so the run would train nothing; give at least one loss "
                             "type a weight above 0")
        return value

    @model_validator(mode="after")
    def _weights_match(self):
        if self.weights is not None and len(self.weights) != len(self.types):
            raise ValueError(
                f"loss.weights has {len(self.weights)} entries for {len(self.types)} loss types"
            )
        return self

    @model_validator(mode="after")
    def _parameters_have_an_effect(self):
        for key, users in PARAMETER_USERS.items():
            value = getattr(self, key)
            if value != type(self).model_fields[key].default and not set(users) & set(self.types):
                raise ValueError(
                    f"loss.{key} is {value}, but loss.type {' + '.join(self.types)} does not use it "
                    f"(only {' and '.join([', '.join(users[:-1]), users[-1]] if len(users) > 1 else users)} "
                    f"do{'es' if len(users) == 1 else ''}); remove loss.{key} "
                    "or choose a loss that uses it"
                )
        return self

    @model_validator(mode="after")
    def _exo_needs_a_positive_epsilon(self):
        if "exo_pair" in self.types and self.label_smoothing == 0:
            raise ValueError(
                "loss.type exo_pair needs loss.label_smoothing above 0, its epsilon: at 0 the label is "
                "one-hot and EXO's KL to it is infinite; set loss.label_smoothing: 0.001 (the EXO paper's)"
            )
        return self

    @model_validator(mode="after")
    def _f_divergence_only_where_defined(self):
        undefined = [t for t in self.types if t not in (*F_DIVERGENCE_LOSSES, "sft")]
        if self.f_divergence_type != "reverse_kl" and undefined:
            raise ValueError(
                f"loss.f_divergence_type {self.f_divergence_type} is defined only for losses of a "
                f"chosen-minus-rejected reward difference ({', '.join(F_DIVERGENCE_LOSSES)}, beside sft), "
                f"where f-DPO's per-prompt constant cancels, not for {' and '.join(undefined)}; "
                "remove loss.f_divergence_type or those loss types"
            )
        if self.f_divergence_type != "reverse_kl" and self.reference_free:
            raise ValueError(
                f"loss.f_divergence_type {self.f_divergence_type} measures how far the policy moves from the "
                "reference, and loss.reference_free: true has none; remove one of the two"
            )
        coef = self.f_alpha_divergence_coef
        if self.f_divergence_type != "alpha_divergence" and coef != type(self).model_fields["f_alpha_divergence_coef"].default:
            raise ValueError(
                f"loss.f_alpha_divergence_coef is {coef}, but loss.f_divergence_type is "
                f"{self.f_divergence_type}, which does not use it; set loss.f_divergence_type: "
                "alpha_divergence, or remove loss.f_alpha_divergence_coef"
            )
        return self

    @model_validator(mode="after")
    def _wpo_and_ld_only_where_defined(self):
        wide = [t for t in self.types if t in BATCH_WIDE]
        if self.wpo_weighting and wide:
            raise ValueError(
                f"loss.wpo_weighting weighs each pair's loss, but loss.type {' and '.join(wide)} sorts margins "
                "across the batch, so its entries are not pairs; remove loss.wpo_weighting or those loss types"
            )
        if self.ld_alpha is not None and "sft" in self.types:
            raise ValueError(
                "loss.ld_alpha discounts a response's tokens past the shorter response's length, so sft "
                "would no longer be the NLL of the whole chosen response (TRL's sft is not discounted); "
                "remove loss.ld_alpha or sft"
            )
        return self

    @property
    def types(self) -> list[str]:
        return [self.type] if isinstance(self.type, str) else list(self.type)

    @property
    def type_weights(self) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * len(self.types)


class OptimConfig(Section):
    name: Literal["adamw", "rmsprop"] = "adamw"
    lr: float = Field(1.0e-6, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    # Above 0: at 0 a parameter whose gradient is 0 (a token the data never holds) is moved by 0 / 0.
    eps: float = Field(1.0e-8, gt=0.0)
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    # Whole steps, or below 1 a share of the run's optimizer steps, rounded up (transformers 5's
    # convention, which replaced its `warmup_ratio`): 0.1 warms up over the first tenth.
    warmup_steps: int | float = Field(0, ge=0)
    # 0 or null: no clipping. A negative norm turned every gradient around (clip_grad_norm_ scales by it).
    max_grad_norm: float | None = Field(1.0, ge=0.0)
    fused: bool | None = None  # None: fused AdamW where torch has it (CUDA, and CPU since torch 2.4)

    @field_validator("betas")
    @classmethod
    def _decay_rates(cls, value):
        # Checked here, not by torch once the model and the reference's log-probs are ready.
        if not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError(f"{list(value)}: each of AdamW's two decay rates is at least 0 and below 1, "
                             "e.g. [0.9, 0.999]")
        return value

    @field_validator("warmup_steps")
    @classmethod
    def _whole_steps_or_a_share(cls, value):
        if isinstance(value, float) and value >= 1:
            if not value.is_integer():
                raise ValueError(f"{value} is neither whole steps (e.g. 100) nor a share of the "
                                 "run's steps below 1 (e.g. 0.1)")
            return int(value)
        return value

    @model_validator(mode="after")
    def _adamw_settings_need_adamw(self):
        # RMSprop (preftune.optim.build_optimizer) takes neither: it would run without them, unannounced.
        given = [key for key in ("betas", "fused") if getattr(self, key) != type(self).model_fields[key].default]
        if self.name != "adamw" and given:
            keys = " and ".join(f"optim.{key}" for key in given)
            raise ValueError(f"{keys} {'are' if len(given) > 1 else 'is'} AdamW's, and optim.name is "
                             f"{self.name}, which does not use {'them' if len(given) > 1 else 'it'}; "
                             f"remove {keys}, or set optim.name: adamw")
        return self

    def warmup_steps_in(self, total_steps: int) -> int:
        """The warmup's length in optimizer steps for a run of `total_steps`."""
        if isinstance(self.warmup_steps, float):
            return math.ceil(total_steps * self.warmup_steps)
        return self.warmup_steps


class TrainConfig(Section):
    batch_size: int = Field(8, gt=0)  # pairs per micro-batch
    grad_accum: int = Field(1, gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    seed: int = 0
    eval_every: int | None = Field(None, gt=0)
    eval_batch_size: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    keep_checkpoints: int | None = Field(None, gt=0)
    max_bad_steps: int = Field(10, ge=0)
    output_dir: str = "runs/dpo"
    device: str = "auto"
    logprob_chunk_size: int = Field(1024, gt=0)
    # Also log TRL's `entropy`, `mean_token_accuracy`, `logits/chosen` and `logits/rejected`, worked
    # out from each chunk of the policy's logits: a few more passes over it, so off by default.
    token_metrics: bool = False
    loggers: list[Literal["jsonl", "tensorboard", "wandb"]] = ["jsonl"]
    report: bool = True
    progress: bool = True
    distributed: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    fsdp_cpu_offload: bool = False
    # Seconds a rank waits in a collective before the run is stopped (Hugging Face's ddp_timeout):
    # the other ranks wait while rank 0 alone writes a checkpoint or final/, which on slow shared
    # storage outlasts torch's own default (10 minutes for nccl).
    ddp_timeout: int = Field(1800, gt=0)
    deterministic: bool = False

    @field_validator("output_dir")
    @classmethod
    def _names_a_folder(cls, value):
        # '' was the current folder, where --overwrite deletes whatever checkpoints/ or final/ it holds.
        if not value.strip():
            raise ValueError("an empty name; give the folder the run is written in, e.g. runs/dpo")
        return _home_expanded(value)

    @field_validator("max_steps", mode="before")
    @classmethod
    def _no_limit_is_null(cls, value):
        # TRL's max_steps default, copied over with the rest, was "Input should be greater than 0".
        if value == -1 and not isinstance(value, bool):
            raise ValueError("-1 is TRL's 'no limit'; here that is null: remove train.max_steps to train "
                             "for train.epochs")
        return value

    @field_validator("loggers", mode="before")
    @classmethod
    def _one_logger_as_a_list(cls, value):
        # TRL's `report_to=wandb` habit: one name is a list of one, as `loss.type` takes one name.
        return [value] if isinstance(value, str) else value


class Config(Section):
    model: ModelConfig
    data: DataConfig
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _reference_needed(self):
        reference_free_only = self.loss.reference_free or all(
            t in ("simpo", "sft") for t in self.loss.types
        )
        if self.model.reference == "none" and not reference_free_only:
            raise ValueError(
                "model.reference is 'none' but the loss needs a reference; "
                "set loss.reference_free: true or use simpo/sft"
            )
        return self

    @model_validator(mode="after")
    def _no_reference_settings_without_a_reference(self):
        # loss.reference_free loads no reference at all (preftune.reference.build_reference).
        given = [text for text, is_set in (("model.reference_path", self.model.reference_path is not None),
                                           ("model.reference: precompute", self.model.reference == "precompute"))
                 if is_set]
        if self.loss.reference_free and given:
            raise ValueError(
                f"loss.reference_free is true, so no reference is loaded and {' and '.join(given)} "
                f"would do nothing; remove {'them' if len(given) > 1 else 'it'}, or drop loss.reference_free "
                "to train against that reference"
            )
        return self

    @model_validator(mode="after")
    def _reference_sync_needs_a_reference_copy(self):
        if self.model.reference_sync is None:
            return self
        why = None
        if self.model.reference == "precompute":
            why = ("model.reference: precompute caches the starting reference's log-probs once, and they "
                   "cannot follow a moving reference; set model.reference: copy, or remove model.reference_sync")
        elif self.model.reference == "none" or self.loss.reference_free:
            key = "model.reference: none" if self.model.reference == "none" else "loss.reference_free: true"
            why = f"{key} trains without a reference; remove model.reference_sync"
        elif all(t in ("simpo", "sft") for t in self.loss.types):
            why = f"loss.type {' + '.join(self.loss.types)} never reads the reference; remove model.reference_sync"
        elif self.model.lora is not None:
            why = ("with model.lora the reference is the policy's own base weights with the adapters off, "
                   "so moving it would move the policy too; remove model.lora (full fine-tuning keeps a "
                   "separate reference copy) or model.reference_sync")
        if why:
            raise ValueError(f"model.reference_sync moves the reference during training, but {why}")
        return self

    @model_validator(mode="after")
    def _lora_reference_beside_fsdp(self):
        # LoRA's live reference is the policy with its adapters off (preftune.reference): a
        # forward outside the policy's sharded root would meet sharded embeddings. Said here,
        # before the model and data load, not after.
        live_adapter_reference = (self.model.lora is not None and self.model.reference == "copy"
                                  and not self.model.reference_path and not self.loss.reference_free)
        if self.train.distributed == "fsdp" and live_adapter_reference:
            raise ValueError(
                "with train.distributed: fsdp, LoRA's reference (the policy with its adapters off) cannot "
                "run beside the sharded policy; set model.reference: precompute, or use train.distributed: ddp"
            )
        return self

    @model_validator(mode="after")
    def _cuda_graphs_need_one_micro_batch(self):
        # A CUDA graph's outputs live in its own memory and are overwritten by its next replay;
        # gradients accumulated over micro-batches would be summed into that memory (known to
        # give wrong gradients: pytorch/pytorch#96693), so each step must be one backward.
        if self.model.compile and self.model.compile_mode == "reduce-overhead" and self.train.grad_accum > 1:
            raise ValueError(
                "model.compile_mode 'reduce-overhead' (CUDA graphs) needs train.grad_accum: 1; "
                "raise train.batch_size instead, or use compile_mode 'default'"
            )
        return self

    @model_validator(mode="after")
    def _settings_of_a_path_not_taken(self):
        # Both are read only on their own path (torch.compile, FSDP2's wrapping); elsewhere the run
        # would go on without what the user asked for, and without a word.
        if self.model.compile_mode != "default" and not self.model.compile:
            raise ValueError(
                f"model.compile_mode is {self.model.compile_mode!r}, but model.compile is false, so nothing "
                "is compiled; set model.compile: true, or remove model.compile_mode"
            )
        if self.train.fsdp_cpu_offload and self.train.distributed != "fsdp":
            raise ValueError(
                f"train.fsdp_cpu_offload offloads FSDP2's shards, but train.distributed is "
                f"{self.train.distributed!r}; set train.distributed: fsdp, or remove train.fsdp_cpu_offload"
            )
        return self

    @model_validator(mode="after")
    def _batch_wide_losses_sort_one_micro_batch(self):
        # aot sorts margins across the pairs of one forward: accumulation would sort each
        # micro-batch apart (not the step's pairs together), and one pair sorts to plain DPO.
        wide = [t for t in self.loss.types if t in BATCH_WIDE]
        if not wide:
            return self
        name, train = " and ".join(wide), self.train
        if train.grad_accum > 1:
            raise ValueError(
                f"loss.type {name} sorts margins across one micro-batch, so train.grad_accum: {train.grad_accum} "
                f"would sort {train.grad_accum} micro-batches of {train.batch_size} pairs apart, not the step's "
                f"{train.grad_accum * train.batch_size} together; set train.grad_accum: 1 and train.batch_size: "
                f"{train.grad_accum * train.batch_size}"
            )
        for key, size in (("batch_size", train.batch_size), ("eval_batch_size", train.eval_batch_size)):
            if size is not None and size < 2:
                raise ValueError(
                    f"loss.type {name} sorts margins across a batch, and train.{key}: {size} leaves one pair "
                    f"to sort, which is plain DPO; set train.{key} to 2 or more"
                )
        return self


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form key=value (for example optim.lr=1e-6).")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):  # "=5", ".lr=5", "optim..lr=5": no key for pydantic to name
        raise UserError(f"override {text!r}: the key before '=' is empty or has an empty part; write a "
                        "dotted key such as optim.lr=1e-6.")
    return path, _parse_yaml(raw, f"override {text!r}") if raw.strip() else None


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key written twice in one mapping is an error: safe_load keeps the
    last value and drops the first without a word."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool)):  # unhashable keys: construct_mapping says so
            continue
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is written twice; keep one",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)
# YAML 1.1 (PyYAML) reads 1e3 and 5e-7, exponents without a dot, as strings: `max_steps: 1e3` was
# "unable to parse string as an integer" (a float key took the string). YAML 1.2 reads them as
# numbers, as Python and TRL's command line do.
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                       re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                                       list("-+0123456789."))


def _parse_yaml(text: str, source: str) -> Any:
    """yaml.safe_load with every failure it can raise turned into one sentence naming `source`."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise UserError(f"{source}{where}: not valid YAML ({getattr(e, 'problem', None) or e}).") from None
    except RecursionError:
        raise UserError(f"{source}: YAML nested too deeply to read.") from None
    except ValueError as e:  # e.g. an integer longer than Python's 4300-digit limit
        raise UserError(f"{source}: unreadable YAML value ({str(e)[:120]}).") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = _parse_override(text)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _takes_text_only(path):
            # train.output_dir=20241129 names a folder as typed; quotes would not survive the shell.
            value = text.split("=", 1)[1].strip()
        node = raw
        for part in path[:-1]:
            if node.get(part) is None:  # `train:` left empty in the YAML is an empty section
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise UserError(f"override {text!r}: {'.'.join(path[:-1])} is not a section.")
        node[path[-1]] = value
    return raw


# TRL's DPOConfig / TrainingArguments names that users carry over, and where preftune keeps the
# same setting: an unknown key with one of these names is told its preftune name.
TRL_NAMES = {
    "model_name_or_path": "model.path", "ref_model": "model.reference_path",
    "precompute_ref_log_probs": "model.reference: precompute",
    "gradient_checkpointing": "model.gradient_checkpointing", "bf16": "model.autocast: bfloat16",
    "torch_compile": "model.compile", "disable_dropout": "model.disable_dropout",
    "use_peft": "model.lora (true, or its keys r, alpha, dropout, target_modules)", "lora_r": "model.lora.r", "lora_alpha": "model.lora.alpha",
    "lora_dropout": "model.lora.dropout", "lora_target_modules": "model.lora.target_modules",
    "dataset_name": "data.train", "max_length": "data.max_length",
    "max_prompt_length": "data.max_prompt_length",
    # Same key, other meaning: TRL's mode names the end of the whole sequence kept, preftune's the end of
    # the prompt kept (data.truncation: keep_start cuts the prompt's end, next to the response).
    "truncation_mode": "data.truncation, which names the end of the prompt kept, not of the sequence: TRL's "
                       "keep_start (its default) keeps the prompt whole and cuts completions, which is "
                       "data.max_prompt_length: max_length - 1 here; its keep_end cuts the prompt's start, "
                       "which is data.truncation: keep_end (the default)",
    "padding_free": "data.packing", "beta": "loss.beta",
    "loss_type": "loss.type, with TRL's names; bco_pair shifts rewards by their running mean unless "
                 "loss.bco_reward_shift: none (TRL 1.16's bco_pair)",
    "loss_weights": "loss.weights",
    "label_smoothing": "loss.label_smoothing, which the sigmoid loss reads too (conservative DPO), where "
                       "TRL 1.16's sigmoid ignores it",
    "reference_free": "loss.reference_free", "simpo_gamma": "loss.simpo_gamma",
    "rpo_alpha": "loss.type: [sigmoid, sft] with loss.weights: [1, alpha]",
    "learning_rate": "optim.lr", "optim": "optim.name (adamw or rmsprop)",
    "lr_scheduler_type": "optim.scheduler (constant, linear or cosine; TRL's default is linear, preftune's "
                         "constant)",
    "warmup_steps": "optim.warmup_steps", "weight_decay": "optim.weight_decay",
    "warmup_ratio": "optim.warmup_steps, which below 1 is a share of the run's steps",
    "max_grad_norm": "optim.max_grad_norm", "adam_beta1": "optim.betas", "adam_beta2": "optim.betas",
    "adam_epsilon": "optim.eps", "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "num_train_epochs": "train.epochs, whole epochs (TRL's default is 3, preftune's 1)",
    "max_steps": "train.max_steps", "seed": "train.seed", "output_dir": "train.output_dir",
    "eval_steps": "train.eval_every", "per_device_eval_batch_size": "train.eval_batch_size",
    "save_steps": "train.save_every", "save_total_limit": "train.keep_checkpoints",
    "report_to": "train.loggers, a list of jsonl, tensorboard and wandb (TRL's none is [jsonl])",
    "eval_strategy": "train.eval_every, in optimizer steps (left out, eval pairs are evaluated at the last "
                     "step only)",
    "save_strategy": "train.save_every, in optimizer steps (leave it out to save only final/)",
    "dataset_train_split": "data.split", "dataset_test_split": "data.eval_split",
    "dataset_config": "data.config", "dtype": "model.dtype", "torch_dtype": "model.dtype",
    "ddp_timeout": "train.ddp_timeout", "use_cpu": "train.device: cpu", "torch_compile_mode": "model.compile_mode",
    "fsdp": "train.distributed: fsdp",
    "sync_ref_model": "model.reference_sync (true, or its keys every and alpha)", "ref_model_sync_steps": "model.reference_sync.every",
    "ref_model_mixup_alpha": "model.reference_sync.alpha", "discopop_tau": "loss.discopop_tau",
    "f_divergence_type": "loss.f_divergence_type", "f_alpha_divergence_coef": "loss.f_alpha_divergence_coef",
    "trust_remote_code": "model.trust_remote_code", "attn_implementation": "model.attn_implementation",
    "ld_alpha": "loss.ld_alpha", "use_weighting": "loss.wpo_weighting",
}
# DPOConfig settings with no preftune counterpart: a ported config learns which, and why, rather
# than reading only "unknown key".
TRL_ONLY = {
    "activation_offloading": "activation offloading, which preftune does not implement; "
                             "model.gradient_checkpointing saves activation memory",
    "pad_to_multiple_of": "padding to a multiple, which preftune does not need: it packs or pads to the "
                          "longest sequence",
    "dataset_num_proc": "parallel preprocessing, which preftune does not use: it tokenizes in one process",
    "logging_steps": "a logging interval, which preftune does not need: it logs every optimizer step",
    "precompute_ref_batch_size": "the batch size of the reference precompute, which preftune sets itself "
                                 "(4 x the larger of train.batch_size and train.eval_batch_size)",
    "fp16": "float16 mixed precision, which preftune does not offer; model.autocast: bfloat16 is bf16",
    "run_name": "the run's name, which is train.output_dir's folder name (TensorBoard's folder, W&B's run "
                "name); set WANDB_NAME to name the W&B run otherwise",
}


def _known_keys_hint(loc: tuple) -> str:
    """'; did you mean ...; the keys of <section> are ...' for an unknown key at `loc`."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        # The section's class: the field's type, or the model branch of `X | None`.
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())] if field else []
        sections = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not sections:
            return ""
        model = sections[0]
    names = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.5)
    section = ".".join(str(p) for p in loc[:-1]) or "the config"
    guess = f" (did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?)" if close else ""
    if str(loc[-1]) in TRL_NAMES:
        guess = f" (TRL's name: preftune's is {TRL_NAMES[str(loc[-1])]})"
    elif str(loc[-1]) in TRL_ONLY:
        guess = f" (a TRL setting: {TRL_ONLY[str(loc[-1])]}; remove it)"
    return f"{guess}; the keys of {section} are {', '.join(names)}"


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if not key or (error["type"] == "value_error" and key in Config.model_fields):
        # A check across keys (of the config or of one section); its message names them.
        return message
    if error["type"] == "extra_forbidden":
        return f"unknown key {key!r}{_known_keys_hint(error['loc'])}"
    if error["type"] == "missing":
        return f"missing required key {key!r}"
    if len(error["loc"]) == 1 and key in TRL_NAMES and not isinstance(error.get("input"), dict):
        # TRL's flat `optim: adamw_torch` lands on preftune's optim section.
        return f"key {key!r} is a section of keys here; TRL's {key} setting is {TRL_NAMES[key]}"
    return f"key {key!r}: {message}"


def _one_error_per_union(errors: list[dict]) -> list[dict]:
    """pydantic reports a value that fits no member of a union (`str | list[str]`) once per member,
    each loc holding the member's name ('data.train.str', 'data.train.list[str]'): one error per
    union reads as the user wrote it. A member that went deeper (an item of the list) is the one
    the value meant, so its error is kept alone; at equal depth the messages are joined."""
    kept: dict = {}
    for error in errors:
        loc = error["loc"]
        member = next((i for i, part in enumerate(loc) if error["type"] != "extra_forbidden"
                       and isinstance(part, str) and re.fullmatch(r"str|int|float|bool|(list|literal)\[.*\]", part)),
                      None)
        if member is None:
            kept[len(kept), loc] = error
            continue
        error = dict(error, loc=loc[:member] + loc[member + 1:])
        union = loc[:member]
        if union not in kept or len(error["loc"]) > len(kept[union]["loc"]):
            kept[union] = error
        elif len(error["loc"]) == len(kept[union]["loc"]):
            kept[union]["msg"] += " or " + error["msg"].removeprefix("Input should be ")
    return list(kept.values())


def _override_that_set(loc: tuple, overrides: list[str]) -> str | None:
    """The last override that wrote the key at `loc` or a section holding it (it replaced the
    section whole), or None when the key came from the file."""
    key = tuple(map(str, loc))
    setters = [text for text in overrides if key[:len(path := _parse_override(text)[0])] == tuple(path)]
    return setters[-1] if setters else None


def _written_as(loc: tuple, text: str | None, overrides: list[str]) -> str | None:
    """How the plain YAML scalar at `loc` was written, in the override that set it or else in the
    config file's `text`; None where that is unknown (a dict given to the Python API)."""
    if (setter := _override_that_set(loc, overrides)) is not None:
        text, loc = setter.split("=", 1)[1], loc[len(_parse_override(setter)[0]):]
    if text is None:
        return None
    node = yaml.compose(text, Loader=_UniqueKeyLoader)  # it loaded already, so it composes
    for part in map(str, loc):
        if isinstance(node, yaml.MappingNode):
            node = next((value for key, value in node.value if key.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
        else:
            return None
    return node.value if isinstance(node, yaml.ScalarNode) and node.style is None else None


def _refuse_a_flat_trl_config(raw: dict, source: str) -> None:
    """A TRL config copied over whole (flat DPOConfig keys) gets every key's preftune name at
    once: three errors per try made a 15-key config take five tries."""
    trl = [key for key, value in raw.items() if (key in TRL_NAMES or key in TRL_ONLY)
           and not (key in Config.model_fields and isinstance(value, dict))]
    if len(trl) < 2:
        return
    lines = [f"  {key}: {TRL_NAMES[key]}" if key in TRL_NAMES else f"  {key}: remove it ({TRL_ONLY[key]})"
             for key in trl]
    raise UserError(f"{source}: {len(trl)} keys are TRL's, where preftune keeps its settings in sections "
                    "(model, data, loss, optim, train); write each as preftune's key, e.g. loss: {beta: 0.1}:\n"
                    + "\n".join(lines))


def validate_config(raw: dict, source: str = "config", overrides: list[str] = (),
                    text: str | None = None) -> Config:
    """`text`: the YAML the config was read from, to quote a value as it was written."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections (model, data, loss, optim, train).")
    # A section left empty in the YAML (`loss:`, its keys commented out) is an empty section, as
    # apply_overrides reads it: its defaults, not "Input should be a valid dictionary".
    raw = {key: {} if value is None and key in Config.model_fields else value for key, value in raw.items()}
    _refuse_a_flat_trl_config(raw, source)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        errors = _one_error_per_union(e.errors())[:3]
        for error in errors:
            if isinstance((error.get("ctx") or {}).get("error"), _NumberForText) and \
                    (written := _written_as(error["loc"], text, overrides)) is not None:
                error["msg"] = f"{written} is read as a number; put it in quotes to give it as text ('{written}')"
        problems = "; ".join(_describe(err) for err in errors)
        # A key the command line set is not in the file: name the override, or the user searches
        # the YAML for a typo that is not there.
        culprits = [_override_that_set(err["loc"], overrides) for err in errors]
        if all(culprits):
            source = ", ".join(f"override {text!r}" for text in dict.fromkeys(culprits))
        raise UserError(f"{source}: {problems}.") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from {} when path is None), apply overrides, validate."""
    raw: dict = {}
    source, text = "overrides", None
    if path is not None:
        path = Path(path)
        source = str(path)
        if path.is_dir():  # a run folder, most often
            raise UserError(f"config file {path} is a folder; pass a YAML file (a run's is {path / 'config.yaml'}).")
        if not path.is_file():
            raise UserError(f"config file {path} does not exist.")
        try:
            text = path.read_text(encoding="utf-8-sig")
            raw = _parse_yaml(text, str(path)) or {}
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text; save the config as UTF-8.") from None
    if not isinstance(raw, dict):  # before the overrides, which index into it
        raise UserError(f"{source}: expected a mapping of sections (model, data, loss, optim, train).")
    raw = apply_overrides(raw, overrides or [])
    return validate_config(raw, source, overrides or [], text)


def config_yaml(config: Config) -> str:
    """`config` as the YAML a run's config.yaml holds: every key, defaults included."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def dump_config(config: Config, path: str | Path) -> None:
    """Write `config` as YAML, atomically: a run's config.yaml is what its resume command reads,
    and a full disk or a kill mid-write must leave the old one, not a truncated one."""
    from preftune.records import write_text_atomic

    write_text_atomic(path, config_yaml(config))


def with_absolute_paths(config: Config) -> Config:
    """A copy of the config for the run's config.yaml whose local paths are absolute, so that
    `preftune export`, `eval` and `train --resume` find the model, data and run from any
    directory. A name that exists nowhere here (a Hub id) is left as it is."""
    from preftune.records import recorded_path

    def absolute(value):
        return [recorded_path(v) for v in value] if isinstance(value, list) else recorded_path(value)

    model = config.model.model_copy(update={"path": absolute(config.model.path),
                                            "reference_path": absolute(config.model.reference_path)})
    data = config.data.model_copy(update={"train": absolute(config.data.train),
                                          "eval": absolute(config.data.eval)})
    train = config.train.model_copy(update={"output_dir": os.path.abspath(config.train.output_dir)})
    return config.model_copy(update={"model": model, "data": data, "train": train})


def flat_config(config: dict, prefix: str = "") -> dict:
    """A nested config (a `model_dump`, or a run's config.yaml read back) as dotted keys to their
    values, the names --set takes: {"loss": {"beta": 0.1}} is {"loss.beta": 0.1}. Lists and None
    are kept as they are; each reader decides how to show them."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= flat_config(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
