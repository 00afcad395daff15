"""Evaluation on held-out preference pairs: implicit-reward accuracy, margins, log-probs.

The numbers carry the keys of training's metrics, so `eval/rewards/accuracies` in
metrics.jsonl and the output of `preftune eval pairs` mean the same thing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml

from preftune.data.collate import PairBatch, collate_pairs
from preftune.data.tokenize import TokenizedPair
from preftune.errors import UserError
from preftune.losses import REFERENCE_FREE, PairLogps, preference_loss
from preftune.metrics import StepMetrics
from preftune.records import recorded_path, write_json_atomic
from preftune.token_stats import WPO, wanted_stats, wpo_weights


def pair_logps(policy_logps, reference_logps, batch: PairBatch) -> PairLogps:
    """Policy (with grad) and reference (without) log-probs of a concatenated pair batch, and
    WPO's pair weights when the policy module returns WPO's statistic (loss.wpo_weighting)."""
    logps, lengths, *stats = policy_logps(batch.input_ids, batch.model_attention_mask, batch.completion_mask,
                                          batch.position_ids, batch.sequence_ids, batch.shared, batch.counted)
    stat_sums = dict(stats[0]) if stats else {}  # {name: (2B,)} per-sequence sums of token_stats' statistics
    weights = wpo_weights(stat_sums.pop(WPO), lengths) if WPO in stat_sums else None  # (2B,)
    reference = reference_logps(batch).to(logps.dtype)  # (2B,)
    b = batch.num_pairs
    return PairLogps(
        policy_chosen_logps=logps[:b], policy_rejected_logps=logps[b:],
        reference_chosen_logps=reference[:b], reference_rejected_logps=reference[b:],
        chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
        pair_weights=weights[:b] * weights[b:] if weights is not None else None,  # (B,) w(y_w) * w(y_l)
        token_stat_sums=stat_sums or None,  # what remains: train.token_metrics' statistics
    )


@torch.no_grad()
def evaluate_pairs(policy_logps, reference_logps, pairs: list[TokenizedPair], config, device,
                   pad_token_id: int, batch_size: int | None = None, rank: int = 0,
                   world_size: int = 1, reward_shift: float = 0.0) -> dict[str, float]:
    """Mean loss, rewards, accuracy, margins and log-probs over `pairs`, plus mean lengths.

    With world_size > 1 every rank must call it: each scores every world_size-th pair and the
    sums are reduced across ranks, so all ranks return the means over all of `pairs`.
    `reward_shift` is bco_pair's delta, read and never updated here.
    """
    was_training = getattr(policy_logps, "training", False)
    if hasattr(policy_logps, "eval"):
        policy_logps.eval()
    batch_size = batch_size or config.train.eval_batch_size or config.train.batch_size
    metrics = StepMetrics.for_config(config, device)
    token_sums = torch.zeros(2, dtype=torch.float64, device=device)  # chosen, rejected
    share = pairs[rank::world_size]
    # Every rank runs as many forwards as the largest share (FSDP gathers weights inside each
    # forward, with all ranks); a rank whose share ran out scores a stand-in and drops it.
    for start in range(0, len(pairs[::world_size]), batch_size):
        chunk = share[start:start + batch_size]
        batch = collate_pairs(chunk or pairs[:1], pad_token_id).to(device)
        logps = pair_logps(policy_logps, reference_logps, batch)
        if chunk:
            metrics.add(preference_loss(logps, config.loss, reward_shift), logps, config.loss.beta)
            token_sums += torch.stack([logps.chosen_lengths.sum(), logps.rejected_lengths.sum()]).double()
    if was_training:
        policy_logps.train()
    results = metrics.reduce()
    if world_size > 1:
        torch.distributed.all_reduce(token_sums)
    n = max(len(pairs), 1)
    results["lengths/chosen"] = token_sums[0].item() / n
    results["lengths/rejected"] = token_sums[1].item() / n
    return results


# ------------------------------------------------------------------ `preftune eval pairs`

# Written by `preftune export` beside the merged weights: the adapter, the base and the run's config.
EXPORT_RECORD = "preftune_export.yaml"


def run_config(model_path: str | Path) -> dict:
    """The config.yaml of the `preftune train` run that saved `model_path`, or {}.

    A run writes RUN/config.yaml, RUN/final and RUN/checkpoints/step-N, and `preftune export`
    copies the config into the merged model's folder; from the config the evaluator takes the
    defaults a user would otherwise have to repeat (beta, loss, max_length, reference).
    """
    folder = Path(model_path)
    if (folder / EXPORT_RECORD).is_file():  # a merged model written by `preftune export`
        record = yaml.safe_load((folder / EXPORT_RECORD).read_text(encoding="utf-8")) or {}
        config = record.get("run_config") if isinstance(record, dict) else None
        return config if isinstance(config, dict) else {}
    candidates = [folder.parent / "config.yaml"] if folder.name == "final" else []
    if folder.parent.name == "checkpoints":
        candidates.append(folder.parent.parent / "config.yaml")
    for path in candidates:
        if path.is_file():
            try:
                config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError:
                raise UserError(f"{path}: not valid YAML; fix it or pass --beta/--loss/--reference.") from None
            return config if isinstance(config, dict) else {}
    return {}


def no_reference_error(model_path) -> UserError:
    """Why no reference could be found for `model_path`: most often a run's own folder given for
    its model, or a path that is no folder here, which the bare "no reference" hides."""
    folder = Path(model_path)
    if (folder / "config.yaml").is_file() and not (folder / "config.json").is_file():
        return UserError(f"{folder} is a training run's folder, not a model; pass --model "
                         f"{folder / 'final'} (or one of its checkpoints/step-N).")
    if not folder.exists():
        return UserError(f"{folder} is not a folder here; pass the trained model's folder "
                         "(RUN/final), or, for a model from the Hub, --reference too.")
    return UserError(f"{model_path}: no --reference given and no run config.yaml names one; "
                     "pass --reference with the model the policy was trained against.")


def reference_of_run(run: dict) -> str | None:
    """The reference a run trained against: model.reference_path, else its starting model."""
    model = run.get("model") or {}
    return model.get("reference_path") or model.get("path")


def pairs_eval_config(model_path, data, run: dict, beta: float | None, loss: str | None,
                      batch_size: int, max_length: int | None, dtype: str,
                      token_metrics: bool | None = None):
    """A training Config whose loss, data and train.token_metrics settings are the run's, with the
    user's overrides (token_metrics None: the run's)."""
    from preftune.config import validate_config
    from preftune.losses import BATCH_WIDE, PARAMETER_USERS

    loss_cfg = dict(run.get("loss") or {})
    run_types = loss_cfg.get("type", "sigmoid")
    types = [run_types] if isinstance(run_types, str) else list(run_types)
    if loss is not None:
        given = [t.strip() for t in loss.split(",")]
        if repeated := sorted({t for t in given if t and given.count(t) > 1}):  # the config's advice
            # names loss.weights, which eval pairs has no option for
            raise UserError(f"preftune eval pairs: --loss {loss}: {', '.join(repeated)} is listed more than "
                            "once; give each type once.")
        if given != types:
            loss_cfg.pop("weights", None)  # the run's weights belonged to the run's loss types
        types = given
        loss_cfg["type"] = types if len(types) > 1 else types[0]
        for key, users in PARAMETER_USERS.items():  # and so did settings the new types never use
            if not set(users) & set(types):
                loss_cfg.pop(key, None)
        if BATCH_WIDE & set(types):  # WPO weighs pairs, which these losses' entries are not
            loss_cfg.pop("wpo_weighting", None)
        if "sft" in types:  # the chosen response's NLL is not LD-DPO's discounted sum
            loss_cfg.pop("ld_alpha", None)
    if beta is not None:
        loss_cfg["beta"] = beta
    if "exo_pair" in types and not loss_cfg.get("label_smoothing"):  # the config would say "set
        # loss.label_smoothing", a training key this command has no option for
        raise UserError("preftune eval pairs: --loss exo_pair needs label smoothing above 0, its epsilon, "
                        "which eval pairs takes from the run's loss.label_smoothing (set in training), and "
                        "this model's run sets none; pass another --loss, or evaluate a run trained with "
                        "loss.label_smoothing above 0 (0.001 is the EXO paper's).")
    wide = sorted(BATCH_WIDE & set(types))
    if wide and batch_size < 2:  # said here in the option's name, not as train.eval_batch_size
        raise UserError(f"preftune eval pairs: loss {' and '.join(wide)} sorts margins across a batch, and "
                        f"--batch-size {batch_size} leaves one pair to sort, which is plain DPO; pass "
                        "--batch-size 2 or more.")
    data_cfg = {k: v for k, v in (run.get("data") or {}).items()
                if k in ("max_prompt_length", "truncation")}
    run_max_length = (run.get("data") or {}).get("max_length", 1024)
    data_cfg.update(train=str(data), max_length=run_max_length if max_length is None else max_length)
    if data_cfg["max_length"] is None:  # nothing is cut, so a prompt budget did nothing (the config
        data_cfg.pop("max_prompt_length", None)  # now refuses it; runs from before still evaluate)
    # The run's numerics: a run under bf16 autocast is evaluated under it, as its eval/ lines were.
    model_cfg = {"path": str(model_path), "dtype": dtype, "autocast": (run.get("model") or {}).get("autocast", "none")}
    # The run's eval/ lines carried TRL's token metrics when it trained with them: so does this record.
    if token_metrics is None:
        token_metrics = (run.get("train") or {}).get("token_metrics", False)
    raw = {"model": model_cfg, "data": data_cfg,
           "loss": loss_cfg, "train": {"eval_batch_size": batch_size, "token_metrics": token_metrics}}
    try:
        return validate_config(raw, source="preftune eval pairs")
    except UserError as e:  # a bad option is named as the user typed it, not as the config key it fills
        message = str(e)
        for key, option in OPTION_OF_KEY.items():
            message = message.replace(f"key '{key}'", option)
        raise UserError(message) from None


# The config keys `eval pairs` fills from its options.
OPTION_OF_KEY = {"model.path": "--model", "model.dtype": "--dtype", "data.train": "--data",
                 "data.max_length": "--max-length", "loss.type": "--loss", "loss.beta": "--beta",
                 "train.eval_batch_size": "--batch-size"}


def evaluate_pairs_file(
    model_path: str | Path, data: str | Path, reference_path: str | Path | None = None, *,
    beta: float | None = None, loss: str | None = None, batch_size: int | None = None,
    max_length: int | None = None, out: str | Path | None = None, device: str = "auto",
    dtype: str | None = None, split: str = "train", token_metrics: bool | None = None,
    data_config: str | None = None,
) -> dict:
    """Implicit-reward accuracy, margins, log-probs and lengths of a model on held-out pairs.

    Defaults for beta, loss, reference, max_length, dtype and batch_size come from the run's
    config.yaml when the model is RUN/final or RUN/checkpoints/step-N, and a run that computed under bf16 autocast
    is evaluated under it, so the numbers are the run's own `eval/` ones. token_metrics: also TRL's
    entropy, mean_token_accuracy and logits/* (None: as the run's train.token_metrics, else off).
    The record (training's `eval/` keys plus what was evaluated) is added to eval.json in `out`
    (default: the model folder) and returned.
    """
    from preftune.data.io import load_pairs
    from preftune.data.tokenize import tokenize_pairs
    from preftune.logprobs import CompletionLogps
    from preftune.modeling import (
        autocast_context,
        check_reference_vocabulary,
        freeze,
        load_causal_lm,
        load_tokenizer,
        pick_device,
    )
    from preftune.reference import FrozenModelReference, no_reference

    out = Path(out) if out else default_out_folder(model_path)
    check_out_folder(out)
    run = run_config(model_path)
    run_model = run.get("model") or {}
    dtype = dtype or run_model.get("dtype") or "float32"
    if batch_size is None:  # the run's evaluation batches: aot's eval/ loss sorts within each one
        run_train = run.get("train") or {}
        batch_size = run_train.get("eval_batch_size") or run_train.get("batch_size") or 8
    config = pairs_eval_config(model_path, data, run, beta, loss, batch_size, max_length, dtype, token_metrics)
    reference_free = config.loss.reference_free or all(
        t in REFERENCE_FREE for t in config.loss.types)
    if config.loss.reference_free and reference_path is not None:
        raise UserError(f"--reference {reference_path}: the run's loss.reference_free: true scores "
                        "without a reference (rewards are beta * log pi), as training did; drop --reference.")
    # Training scores such runs without a reference (preftune.reference.build_reference), so its
    # eval/ rewards are beta * log pi: the run's starting model as the reference here would
    # report other numbers under the same names.
    scored_without_reference = config.loss.reference_free or (
        reference_free and run_model.get("reference") == "none")
    if reference_path is None and not scored_without_reference:
        reference_path = reference_of_run(run)
    if reference_path is None and not reference_free:
        raise no_reference_error(model_path)
    torch_device = pick_device(device, "--device")
    autocast = autocast_context(config.model.autocast, torch_device)
    tokenizer = load_tokenizer(str(model_path), setting="--model")
    loaded = load_pairs(str(data), split, setting="--data", config=data_config)
    pairs, counts = tokenize_pairs(loaded.pairs, tokenizer, config.data)
    if not pairs:
        raise UserError(f"{data}: no pair is left after tokenization ({dict(counts)}); "
                        "raise --max-length or check the rows.")
    chunk = config.train.logprob_chunk_size
    policy = freeze(load_causal_lm(str(model_path), dtype, setting="--model")).to(torch_device)
    reference_model = None if reference_free and reference_path is None else \
        freeze(load_causal_lm(str(reference_path), dtype, setting="--reference")).to(torch_device)
    if reference_model is not None and str(reference_path) != str(model_path):
        check_reference_vocabulary(str(model_path), str(reference_path), reference_model, policy, setting="--reference")
    check_pairs_fit(pairs, data, ((policy, "--model", model_path), (reference_model, "--reference", reference_path)))
    ld_alpha = config.loss.ld_alpha
    reference = no_reference if reference_model is None else \
        FrozenModelReference(reference_model, chunk, autocast, ld_alpha)
    with autocast():
        results = evaluate_pairs(CompletionLogps(policy, chunk, ld_alpha, wanted_stats(config)), reference,
                                 pairs, config,
                                 torch_device, tokenizer.pad_token_id, batch_size)
    record = {
        "kind": "pairs", "model": str(model_path),
        "reference": recorded_path(reference_path), "data": recorded_path(data), "split": split,
        **({"data_config": data_config} if data_config else {}),
        # Truncated pairs are evaluated (cut to max_length); skipped ones are not.
        "n_pairs": len(pairs), "truncated": counts.pop("truncated", 0),
        "skipped": dict(loaded.skipped + counts),
        "loss_type": config.loss.type, "beta": config.loss.beta,
        **{f"eval/{key}": value for key, value in results.items()},
    }
    write_eval_record(out, record)
    return record


def check_pairs_fit(pairs, data, models, advice: str = "pass --max-length {limit} or less") -> None:
    """The longest pair fits every model's positions, else one sentence: a model with learned
    positions (GPT-2) failed with an IndexError traceback mid-evaluation, and one with rotary
    positions scored tokens past the lengths it was trained on. `models`: (model or None, option,
    path) triples; `advice`: what to change, `{limit}` standing for the model's positions."""
    from preftune.modeling import context_length, context_length_source

    longest = max(pairs, key=lambda pair: pair.length)
    for model, option, path in models:
        limit = None if model is None else context_length(model)
        if limit is not None and longest.length > limit:
            raise UserError(
                f"{longest.origin or data}: the pair runs to {longest.length} tokens, more than the "
                f"{limit} positions of {option} {path} ({context_length_source(model)}); "
                f"{advice.format(limit=limit)}.")


# ------------------------------------------------------------------ eval.json


def same_evaluation(a: dict, b: dict) -> bool:
    """Whether two eval.json records are the same evaluation (a rerun replaces the earlier).

    Generations drawn otherwise (another temperature, top-k, top-p, min-p or max_new_tokens, as in a sweep
    of win rate against temperature) are another evaluation; another seed is a rerun. So is
    another model written into the same folder.
    """
    keys = ("kind", "reference", "judge", "data", "prompts")

    def drawn(record: dict) -> dict:
        return {k: v for k, v in (record.get("sampling") or {}).items() if k != "seed"}

    # Records written before `split` was recorded read the train split.
    return (all(a.get(k) == b.get(k) for k in keys) and drawn(a) == drawn(b)
            and a.get("split", "train") == b.get("split", "train") and a.get("data_config") == b.get("data_config")
            and _same_model(a.get("model"), b.get("model")))


def _same_model(a: str | None, b: str | None) -> bool:
    """Another model evaluated into the same --out folder is another evaluation, not a rerun
    (one model's record would silently replace the other's); the same folder named two ways
    (relative, absolute, through a link) is the same model."""
    if a == b:
        return True
    try:
        return a is not None and b is not None and os.path.samefile(a, b)
    except OSError:  # a hub id, or a folder no longer there
        return False


def read_eval_records(path: str | Path) -> list[dict]:
    """The evaluations in an eval.json: one object, a list, or {"evals": [...]} (the report's forms)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}); fix or delete it.") from None
    items = data.get("evals", [data]) if isinstance(data, dict) else data
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise UserError(f"{path}: expected an eval.json object or a list of them; fix or delete it.")
    return items


def default_out_folder(model_path) -> Path:
    """Where eval.json goes without --out: the model's folder. A hub id names none here, and a
    folder made under its name (./org/name) would be loaded instead of the Hub's model next time."""
    from preftune.modeling import check_local_folder

    check_local_folder(str(model_path), "--model")  # a path that names no folder is a typo
    folder = Path(model_path).expanduser()
    if not folder.is_dir():
        raise UserError(f"--model {model_path} is a hub id, not a folder here, so eval.json has no model "
                        "folder to go in; pass --out FOLDER.")
    return folder


def check_out_folder(folder: Path) -> None:
    """eval.json goes into `folder`: an existing file there is one sentence, said before any
    model is loaded, not a traceback from mkdir after the work."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file; name a folder for eval.json (created if missing).")


def write_eval_record(folder: Path, record: dict) -> Path:
    """Add `record` to folder/eval.json, replacing an earlier run of the same evaluation.

    One model may be evaluated on pairs and on generations (and by several judges); a file with
    more than one evaluation holds {"evals": [...]}, which `preftune report` reads.
    """
    check_out_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "eval.json"
    records = [r for r in read_eval_records(path) if not same_evaluation(r, record)] + [record]
    payload = records[0] if len(records) == 1 else {"evals": records}
    write_json_atomic(path, payload)
    return path
