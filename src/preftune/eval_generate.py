"""Evaluation on generations: win rate, rewards, KL(pi || ref) and lengths; several models at once.

For every prompt x the policy pi and the reference pi_ref each write one response, seeded alike
(common random numbers: when pi == pi_ref both write the very same text). Then:

* a judge compares the two. A reward judge (`reward:MODULE:FUNCTION`, `FILE.py:FUNCTION` or a
  reward-model folder) scores each response, and the higher reward wins (equal rewards tie);
  `human` puts the pair into a labeling database instead (see `preftune.eval_human`). The
  order in which a pair is shown is drawn per prompt and recorded in samples.jsonl.
* the win rate counts ties as half a win, with a Wilson 95% interval;
* the sequence-level KL(pi || ref) = E_{y ~ pi}[log pi(y|x) - log ref(y|x)] is estimated twice
  over the policy's own samples, scored on the exact token ids sampled, each with its standard
  error: `kl`, the mean of that log-ratio, and `kl_tokens`, the mean of the summed exact KL of
  the next-token distributions along each sample (lower variance, never negative; see
  `preftune.sample_scores`). Both are unbiased only for samples drawn from pi itself
  (temperature 1, no top-k, top-p or min-p; sampling sets aside the model's own generation-config
  processors, such as a repetition penalty); eval.json says so otherwise.

With several models, every pair of systems (the reference included) is compared on every
prompt by the reward, and a Bradley-Terry leaderboard anchored at the reference is fitted.
"""

from __future__ import annotations

import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from preftune.bradley_terry import Outcome, fit_ratings, mean_with_se, win_rate
from preftune.errors import UserError
from preftune.evaluate import (
    check_out_folder,
    default_out_folder,
    no_reference_error,
    read_eval_records,
    reference_of_run,
    run_config,
    same_evaluation,
    write_eval_record,
)
from preftune.records import recorded_path, write_json_atomic, write_jsonl_atomic, write_text_atomic
from preftune.rewards import REWARD_MODEL_BATCH_SIZE, load_reward
from preftune.sample_scores import SampleScores, score_samples
from preftune.sampling import (
    SamplingSettings,
    _decode_until_stop,
    _stop_token_ids,
    check_all_fit_context,
    generate_token_ids,
    load_model_and_tokenizer,
    load_prompts,
)
from preftune.sampling_settings import describe_sampling

REFERENCE = "reference"  # the reference's name among the systems of a leaderboard
Echo = Callable[[str], None]


@dataclass
class Samples:
    """One system's response to each prompt, as text and as the token ids it sampled."""

    label: str
    path: str
    texts: list[str]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # new tokens, cut after the first stop token (kept)
    lengths: list[int]  # tokens the response holds, stop token not counted
    rewards: list[float] | None = None


@dataclass(frozen=True)
class Judge:
    """`kind` is "reward" or "human"; `spec` is what the user wrote."""

    kind: str
    spec: str
    reward: Callable | None = None


def parse_judge(spec: str, device: str = "auto", trust_remote_code: bool = False,
                reward_batch_size: int | None = None) -> Judge:
    """`human`, `reward:MODULE:FUNCTION` / `reward:FILE.py:FUNCTION`, or a reward-model folder
    (put on `device`, as the models it judges are; running the code it ships only when
    `trust_remote_code`; scoring `reward_batch_size` texts per forward pass, None: rewards.py's
    default)."""
    if reward_batch_size is not None and reward_batch_size < 1:
        raise UserError(f"--reward-batch-size must be at least 1, got {reward_batch_size}.")
    target = spec.removeprefix("reward:")
    if spec == "human":
        judge = Judge("human", spec)
    elif not target:
        raise UserError("--judge reward: names no function; write reward:MODULE:FUNCTION.")
    else:
        judge = Judge("reward", spec, load_reward(target, batch_size=reward_batch_size or REWARD_MODEL_BATCH_SIZE,
                                                  device=device, trust_remote_code=trust_remote_code))
    # After load_reward, as label auto does: a mistyped folder is said as one, not as "drop it".
    if reward_batch_size is not None and not Path(target).expanduser().is_dir():
        raise UserError(f"--reward-batch-size sets the texts a reward model folder scores per forward pass, but "
                        f"--judge {spec} is not one; drop it.")
    return judge


def system_labels(paths: Sequence[str]) -> list[str]:
    """Short unique names: the last folder name, with parents added only where names clash."""
    parts = [Path(p).resolve().parts for p in paths]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            break
        depth += 1
    # The reference holds the name REFERENCE, so a model folder of that name is set apart.
    return [f"model:{label}" if label == REFERENCE else label for label in labels]


# ------------------------------------------------------------------ sampling and scoring


def sample_system(model, tokenizer, prompts: Sequence, settings: SamplingSettings,
                  batch_size: int, label: str, path: str) -> Samples:
    """One response per prompt; prompt i is seeded from (seed, i), whatever the batching.
    `check_prompts_fit_every_model` has measured the prompts against the model's positions."""
    stop_ids = _stop_token_ids(model, tokenizer)
    samples = Samples(label, path, [], [], [], [])
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        indices = list(range(start, start + len(chunk)))
        prompt_ids, rows = generate_token_ids(model, tokenizer, chunk, indices, settings)
        for ids, (completion,) in zip(prompt_ids, rows):
            stopped = bool(completion) and completion[-1] in stop_ids
            samples.prompt_ids.append(ids)
            samples.completion_ids.append(completion)
            samples.lengths.append(len(completion) - int(stopped))
            samples.texts.append(_decode_until_stop(tokenizer, completion, stop_ids, ids))
    return samples


def check_prompts_fit_every_model(paths: Sequence[str], prompts: Sequence, max_new_tokens: int) -> None:
    """Every prompt against every model's positions, before any model samples: checked as each
    model's turn came, a prompt too long for the second model stopped the run only after the
    first had sampled every prompt. Only configs and tokenizers are read here, no weights."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from preftune.modeling import adapter_base, context_length, load_tokenizer, model_config

    limited = []
    for path in paths:
        # What the check reads of a model is its config and its name: a stand-in, not its weights.
        stand_in = SimpleNamespace(config=model_config(path), name_or_path=path)
        limit = context_length(stand_in)
        if limit is not None:
            limited.append((limit, path, stand_in))
    # The fewest positions first: its sentence names every prompt the others would refuse too.
    for _, path, stand_in in sorted(limited, key=lambda item: item[0]):
        try:  # the tokenizer load_model_and_tokenizer gives it, so the prompts' ids are the sampled ones
            tokenizer = load_tokenizer(path) if adapter_base(path) else AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, UserError):
            continue  # loading the model says why, in its own words
        check_all_fit_context(stand_in, tokenizer, prompts, range(len(prompts)), max_new_tokens)


def score(judge: Judge, prompts: Sequence, samples: Samples) -> None:
    """Attach the judge's reward to each response (nothing to do for a human judge)."""
    if judge.kind != "reward":
        return
    cut_before = getattr(judge.reward, "truncated", 0)
    rewards = judge.reward(list(prompts), samples.texts)
    cut = getattr(judge.reward, "truncated", 0) - cut_before  # a reward model folder's count
    if cut:
        print(f"--judge {judge.spec}: {cut} of {len(rewards)} responses of {samples.label} (with "
              f"their prompts) were longer than the reward model's {judge.reward.max_length} tokens "
              f"and were scored cut to them.", file=sys.stderr)
    bad = [r for r in rewards if not math.isfinite(r)]
    if bad:
        raise UserError(f"--judge {judge.spec!r} returned {bad[0]} for a response of "
                        f"{samples.label}; rewards must be finite numbers.")
    samples.rewards = rewards


def outcome(reward_a: float, reward_b: float) -> str:
    """"a", "b" or "tie": the higher reward wins."""
    return "a" if reward_a > reward_b else "b" if reward_b > reward_a else "tie"


def shown_order(seed: int, prompt_index: int) -> list[str]:
    """Which response is shown first, drawn per prompt so it never depends on batching."""
    first_is_policy = random.Random(f"{seed}:order:{prompt_index}").random() < 0.5
    return ["policy", "reference"] if first_is_policy else ["reference", "policy"]


# ------------------------------------------------------------------ one policy against the reference


def comparison_rows(prompts: Sequence, policy: Samples, reference: Samples, scores: SampleScores,
                    seed: int) -> list[dict]:
    """samples.jsonl: one row per prompt with both responses, their scores and the outcome."""
    rows = []
    for i, prompt in enumerate(prompts):
        rewards = {"policy": policy.rewards[i] if policy.rewards else None,
                   "reference": reference.rewards[i] if reference.rewards else None}
        winner = None
        if policy.rewards is not None:
            winner = {"a": "policy", "b": "reference", "tie": "tie"}[
                outcome(rewards["policy"], rewards["reference"])]
        rows.append({
            "pair_id": f"p{i:06d}", "prompt_index": i, "prompt": prompt,
            "responses": {"policy": policy.texts[i], "reference": reference.texts[i]},
            "order": shown_order(seed, i), "reward": rewards, "winner": winner,
            "logps": {"policy": scores.policy_logps[i], "reference": scores.reference_logps[i]},
            "kl": scores.policy_logps[i] - scores.reference_logps[i],
            "kl_tokens": scores.kl_tokens[i],
            "length": {"policy": policy.lengths[i], "reference": reference.lengths[i]},
        })
    return rows


def _number(x: float) -> float | None:
    """JSON has no NaN: a standard error of a single value is written as null."""
    return None if math.isnan(x) else float(x)


def win_summary(winners: Sequence[str]) -> dict:
    """Win rate of "policy" over "reference" (ties half) with its Wilson 95% interval."""
    wins, ties = winners.count("policy"), winners.count("tie")
    rate = win_rate(wins, ties, len(winners))
    return {"win_rate": rate.rate, "win_rate_ci": [rate.lower, rate.upper], "wins": wins,
            "ties": ties, "losses": len(winners) - wins - ties}


def summarize(rows: list[dict], policy: Samples, reference: Samples, judge: Judge,
              settings: SamplingSettings, prompts_source: str | None) -> dict:
    """The eval.json record of one policy (docs/CONTRACTS.md), from its samples.jsonl rows."""
    kl = mean_with_se([r["kl"] for r in rows])
    token_kls = [r["kl_tokens"] for r in rows]  # None where the output layers differ in size
    kl_tokens = None if None in token_kls else mean_with_se(token_kls)
    lengths = {who: mean_with_se([r["length"][who] for r in rows]) for who in ("policy", "reference")}
    record = {
        "kind": "generate", "model": policy.path, "reference": recorded_path(reference.path),
        "judge": judge.spec, "n_prompts": len(rows), "prompts": recorded_path(prompts_source),
        "sampling": {k: v for k, v in settings.to_dict().items() if k != "n"},
        "win_rate": None, "win_rate_ci": None, "wins": None, "ties": None, "losses": None,
        "mean_reward": {"policy": None, "reference": None},
        "mean_reward_se": {"policy": None, "reference": None},
        "reward_margin": None, "reward_margin_se": None,
        "kl": kl.mean, "kl_se": _number(kl.se),
        "kl_tokens": None if kl_tokens is None else kl_tokens.mean,
        "kl_tokens_se": None if kl_tokens is None else _number(kl_tokens.se),
        "mean_length": {who: m.mean for who, m in lengths.items()},
        "mean_length_se": {who: _number(m.se) for who, m in lengths.items()},
        "samples": "samples.jsonl",
    }
    if settings.reshapes_distribution:
        record["kl_note"] = (f"samples were drawn at {describe_sampling(settings.to_dict())}, not from "
                             "the policy itself, so 'kl' is the mean log-ratio under that "
                             "distribution and 'kl_tokens' the mean KL of the per-token "
                             "distributions along its samples, not KL(pi || ref).")
    beta = (run_config(policy.path).get("loss") or {}).get("beta")
    if beta is not None:
        record["beta"] = beta  # the report labels and groups reward-KL points by beta
    if judge.kind == "reward":
        record.update(win_summary([r["winner"] for r in rows]))
        for who in ("policy", "reference"):
            m = mean_with_se([r["reward"][who] for r in rows])
            record["mean_reward"][who], record["mean_reward_se"][who] = m.mean, _number(m.se)
        margin = mean_with_se([r["reward"]["policy"] - r["reward"]["reference"] for r in rows])
        record["reward_margin"], record["reward_margin_se"] = margin.mean, _number(margin.se)
    return record


# ------------------------------------------------------------------ the whole evaluation


def _resolve_prompts(prompts, n_prompts: int | None) -> tuple[list, str | None]:
    source = None
    if isinstance(prompts, (str, Path)):
        source, prompts = str(prompts), load_prompts(prompts)
    prompts = list(prompts)
    if n_prompts is not None:
        if n_prompts < 1:
            raise UserError(f"--n-prompts must be at least 1, got {n_prompts}.")
        prompts = prompts[:n_prompts]
    if not prompts:
        raise UserError("there are no prompts to evaluate on; pass a non-empty --prompts file.")
    return prompts, source


def _check_same_vocabulary(tokenizer, reference_tokenizer, path: str, reference_path: str) -> None:
    if tokenizer.get_vocab() != reference_tokenizer.get_vocab():
        raise UserError(f"{path} and the reference {reference_path} use different tokenizers; "
                        "KL(pi || ref) compares the two on the same token ids, so evaluate a "
                        "policy against the reference it was trained from.")


def output_folders(model_paths: Sequence[str], labels: Sequence[str], out) -> list[Path]:
    """Beside each model, or in --out (one sub-folder per model when there are several)."""
    if out is None:
        return [default_out_folder(p) for p in model_paths]
    if len(model_paths) == 1:
        return [Path(out)]
    return [Path(out) / label.replace("/", "__").replace(":", "_") for label in labels]


def evaluate_generations(model_path, reference_path, prompts, judge: str, **kwargs) -> dict:
    """Evaluate one policy against its reference on generations; returns its eval.json record.

    Takes the keyword arguments of `compare_models`. Files: eval.json and samples.jsonl in
    `out` (default: the model folder).
    """
    return compare_models([model_path], reference_path, prompts, judge, **kwargs)["evals"][0]


@dataclass
class _Job:
    """What every policy of one `compare_models` call shares: prompts, judge, the reference."""

    prompts: list
    source: str | None
    judge: Judge
    settings: SamplingSettings
    batch_size: int
    dtype: str
    device: str
    db: object
    reference: Samples | None = None
    reference_model: object = None
    reference_tokenizer: object = None


def compare_models(
    model_paths: Sequence, reference_path, prompts, judge: str, *,
    n_prompts: int | None = None, max_new_tokens: int = 64, temperature: float = 1.0,
    top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int = 0, batch_size: int = 16,
    out=None, db=None,
    device: str = "auto", dtype: str = "float32", n_bootstrap: int = 1000,
    echo: Echo | None = None, trust_remote_code: bool = False, reward_batch_size: int | None = None,
) -> dict:
    """Evaluate each model against the reference; with several, also a Bradley-Terry leaderboard.

    prompts: a prompt file (.jsonl / .txt, as `preftune sample` reads) or a list of prompts.
    judge: `reward:MODULE:FUNCTION`, `reward:FILE.py:FUNCTION`, a reward-model folder or
        `human` (then `db` is the labeling database the pairs go to).
    trust_remote_code: let a reward-model folder judge run the code it ships (the judge only).
    reward_batch_size: the texts a reward-model folder judge scores per forward pass (None:
        rewards.py's default); with any other judge, a `UserError`.
    reference_path: None means the reference named by the run's config.yaml.
    Returns {"evals": [eval.json record per model], "leaderboard": dict or None,
    "leaderboard_text": the printed table or None, "leaderboard_file": where leaderboard.json
    went or None, "folders": where each model's files went}.
    """
    from preftune.modeling import check_local_folder, quiet_transformers

    quiet_transformers()  # our messages, not a weight-loading bar per model
    echo = echo or (lambda message: None)
    model_paths = [str(p) for p in model_paths]
    if not model_paths:
        raise UserError("pass at least one --model to evaluate.")
    seen: dict[str, str] = {}
    for path in model_paths:  # else both are sampled, then the leaderboard compares one with itself
        key = os.path.realpath(path)
        if key in seen:
            raise UserError(f"--model {path} is given twice (as {seen[key]} too); pass each model once.")
        seen[key] = path
    # Every folder is checked before the reference is sampled, not when its turn comes; a
    # mistyped --model first, as eval pairs does, since no reference can be read from it.
    for path in model_paths:
        check_local_folder(path, "--model")
    reference_path = str(reference_path or reference_of_run(run_config(model_paths[0])) or "")
    if not reference_path:
        raise no_reference_error(model_paths[0])
    check_local_folder(reference_path, "--reference")
    prompts, source = _resolve_prompts(prompts, n_prompts)
    job = _Job(prompts, source, parse_judge(judge, device, trust_remote_code, reward_batch_size),
               SamplingSettings(temperature, top_p, max_new_tokens, seed, n=1, top_k=top_k, min_p=min_p),
               batch_size, dtype, device, db)
    if job.judge.kind == "human" and db is None:
        raise UserError("--judge human needs --db, the labeling database the pairs go to.")
    if job.judge.kind == "human":  # the votes go there only after all the sampling
        from preftune.labeling.store import check_db_path

        check_db_path(db)
    labels = system_labels(model_paths)
    folders = output_folders(model_paths, labels, out)
    for folder in folders:
        check_out_folder(folder)
    check_prompts_fit_every_model([reference_path, *model_paths], prompts, max_new_tokens)

    job.reference_model, job.reference_tokenizer = load_model_and_tokenizer(reference_path, dtype, device,
                                                                            setting="--reference")
    echo(f"sampling the reference {reference_path} on {len(prompts)} prompts")
    job.reference = sample_system(job.reference_model, job.reference_tokenizer, prompts,
                                  job.settings, batch_size, REFERENCE, reference_path)
    score(job.judge, prompts, job.reference)
    evals, systems = [], [job.reference]
    for path, label, folder in zip(model_paths, labels, folders):
        echo(f"sampling {label} ({path})")
        record, policy = _evaluate_policy(job, path, label, folder)
        evals.append(record)
        systems.append(policy)
    leaderboard, leaderboard_file = None, None
    if len(model_paths) > 1 and job.judge.kind == "reward":
        leaderboard = reward_leaderboard(systems, n_bootstrap, seed)
        leaderboard_file = save_leaderboard(leaderboard, leaderboard_folder(model_paths, out))
    return {"evals": evals, "leaderboard": leaderboard.to_dict() if leaderboard else None,
            "leaderboard_text": leaderboard.to_text() if leaderboard else None,
            "leaderboard_file": str(leaderboard_file) if leaderboard_file else None,
            "folders": [str(f) for f in folders]}


def _evaluate_policy(job: _Job, path: str, label: str, folder: Path) -> tuple[dict, Samples]:
    """Sample one policy, score it, estimate its KL; write samples.jsonl and eval.json."""
    model, tokenizer = load_model_and_tokenizer(path, job.dtype, job.device)
    _check_same_vocabulary(tokenizer, job.reference_tokenizer, path, job.reference.path)
    policy = sample_system(model, tokenizer, job.prompts, job.settings, job.batch_size, label, path)
    score(job.judge, job.prompts, policy)
    pad = job.reference_tokenizer.pad_token_id or 0  # padded positions are masked out anyway
    # Both models score each batch: the token-wise KL needs their logits at the same positions.
    scores = score_samples(model, job.reference_model, policy.prompt_ids, policy.completion_ids, pad,
                           job.batch_size)
    del model  # one policy in memory at a time, beside the reference
    rows = comparison_rows(job.prompts, policy, job.reference, scores, job.settings.seed)
    record = summarize(rows, policy, job.reference, job.judge, job.settings, job.source)
    record["system"] = label
    if job.judge.kind == "human":
        from preftune.eval_human import queue_for_humans

        record.update(queue_for_humans(job.db, rows, record))
    folder.mkdir(parents=True, exist_ok=True)
    record["samples"] = samples_file_name(folder, record)
    write_jsonl_atomic(folder / record["samples"], rows)
    write_eval_record(folder, record)
    return record, policy


def samples_file_name(folder: Path, record: dict) -> str:
    """The samples file of `record` in `folder`: the one its earlier run wrote (a rerun replaces
    both), else samples.jsonl, else the first samples-N.jsonl no other evaluation there uses.

    One folder holds several evaluations (judges, prompt sets); sharing one samples file, a
    reward-judged run would overwrite the rows a human-judged one queued for votes.
    """
    taken = set()
    for earlier in read_eval_records(folder / "eval.json"):
        if same_evaluation(earlier, record) and earlier.get("samples"):
            return earlier["samples"]
        taken.add(earlier.get("samples"))
    name, n = "samples.jsonl", 1
    while name in taken:
        n += 1
        name = f"samples-{n}.jsonl"
    return name


# ------------------------------------------------------------------ leaderboard


def reward_outcomes(systems: Sequence[Samples]) -> list[Outcome]:
    """Every pair of systems compared on every prompt, prompt by prompt: the higher reward wins."""
    outcomes = []
    for i in range(len(systems[0].texts)):
        for a in range(len(systems)):
            for b in range(a + 1, len(systems)):
                first, second = systems[a], systems[b]
                result = outcome(first.rewards[i], second.rewards[i])
                if result == "b":
                    first, second = second, first
                outcomes.append(Outcome(first.label, second.label, result == "tie"))
    return outcomes


def reward_leaderboard(systems: Sequence[Samples], n_bootstrap: int = 1000, seed: int = 0):
    """Bradley-Terry ratings of all systems, the reference fixed at 1000.

    The bootstrap resamples prompts, not single comparisons: the comparisons on one prompt share
    its responses (the reference's in every one against it), so they are not independent.
    """
    n_pairs = len(systems) * (len(systems) - 1) // 2
    prompts = [i for i in range(len(systems[0].texts)) for _ in range(n_pairs)]
    return fit_ratings(reward_outcomes(systems), systems=[s.label for s in systems],
                       anchor=REFERENCE, n_bootstrap=n_bootstrap, seed=seed, groups=prompts)


def leaderboard_folder(model_paths: Sequence[str], out) -> Path:
    """--out, else the folder that holds all the models (a run folder for its checkpoints)."""
    if out is not None:
        return Path(out)
    parents = [Path(p).resolve().parent for p in model_paths]
    common = parents[0]
    while not all(p == common or common in p.parents for p in parents):
        common = common.parent
    return common


def save_leaderboard(leaderboard, folder: Path) -> Path:
    """leaderboard.json (the fit, for programs) and leaderboard.md (the table, for people)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "leaderboard.json", leaderboard.to_dict())
    write_text_atomic(folder / "leaderboard.md", leaderboard.to_markdown() + "\n")
    return folder / "leaderboard.json"
