"""Train pi_sft, the demo's starting model, from scratch on the synthetic review world.

In the DPO paper the starting policy is GPT-2 fine-tuned on IMDb reviews; here it is a small
Llama-style model trained from random weights on `preftune.demo.world` reviews with plain
next-token prediction. What matters for the demo is not quality but two properties, both
measured by `reward_spread`:

* its samples read like the world's reviews (the model learns the tiny grammar quickly), and
* their sentiment rewards spread widely and evenly around zero, as the training reviews do,
  so that two samples for the same prompt usually differ in reward and DPO has a direction to
  move the policy in.

Every step sees freshly generated reviews (generation is cheap), so there are no epochs and the
model cannot memorise a fixed corpus. The result is a folder that `AutoModelForCausalLM` and
`AutoTokenizer.from_pretrained` load, tokenizer chat template included, plus `pretrain.json`
with the settings and the loss curve.

Training saves its state every `CHECKPOINT_EVERY` steps to `PROGRESS_FILE` in the output folder
(weights, optimizer, losses, RNG), so a run stopped by Ctrl-C or a kill resumes there and ends
with the very weights an uninterrupted run gives; the file is deleted once pi_sft is complete.

Run it alone with `python -m preftune.demo.pretrain --out runs/pi_sft [--quick]`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from preftune.demo import world
from preftune.demo.tiny import build_model, special_token_ids, train_tokenizer
from preftune.records import write_bytes_atomic, write_text_atomic

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips (padding here)
PROGRESS_FILE = "training-progress.pt"  # the unfinished training's state, beside the model
# At full size a save (about 10 MB) takes about 0.05 s and 50 steps about 7 s: a stop loses at
# most those 7 s of training, for well under a second of saves over the whole training.
CHECKPOINT_EVERY = 50
Echo = Callable[[str], None]


@dataclass(frozen=True)
class PretrainConfig:
    """Model and training sizes; `FULL` and `QUICK` are the demo's two presets."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    vocab_size: int = 512
    steps: int = 400
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    tokenizer_reviews: int = 2000
    seed: int = 0


FULL = PretrainConfig()
QUICK = replace(FULL, hidden_size=64, num_layers=2, intermediate_size=128, steps=150, batch_size=24)


def learning_rate_at(step: int, config: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_batch(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, `labels`, each (B, T); every review ends in EOS.

    No BOS: `preftune sample` and DPO tokenize a text prompt with the tokenizer's defaults, which
    add none, so the model must learn to start reviews without one.
    """
    rows = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask, labels


def train_sft(config: PretrainConfig = FULL, progress: bool = False,
              checkpoint: Path | None = None, every: int = CHECKPOINT_EVERY, echo: Echo = print):
    """Train a tokenizer and a model on world reviews; returns (model, tokenizer, losses).

    With `checkpoint`, the state is saved there every `every` steps and a saved state is resumed
    from: the tokenizer is trained again (it is deterministic, and checked to be the same) and
    the steps before the saved one are not.
    """
    tokenizer = train_tokenizer(
        world.make_reviews(config.tokenizer_reviews, seed=config.seed + 1),
        vocab_size=config.vocab_size,
    )
    tokenizer_digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()

    def fresh_start():
        model = build_model(
            "llama", vocab_size=len(tokenizer), hidden_size=config.hidden_size,
            num_layers=config.num_layers, num_heads=config.num_heads,
            intermediate_size=config.intermediate_size, max_positions=128, seed=config.seed,
            special_ids=special_token_ids(tokenizer),
        )
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
            betas=(0.9, 0.95),
        )
        return model, optimizer

    model, optimizer = fresh_start()
    start, losses = 0, []
    saved = _read_progress(checkpoint, config, tokenizer_digest, echo) if checkpoint else None
    if saved is not None:
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            # Training draws no random numbers today; restored so that it stays exact if it does.
            torch.set_rng_state(saved["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:  # a file that unpickled but does not fit
            echo(f"ignored {checkpoint}, a damaged partial pi_sft checkpoint ({_first_line(e)}); "
                 "training pi_sft from the start")
            model, optimizer = fresh_start()  # a failed load may have filled part of them
        else:
            start, losses = saved["step"], list(saved["losses"])
            echo(f"resuming pi_sft's training at step {start} of {config.steps}, where the earlier "
                 f"run saved it ({checkpoint})")
    # Fresh reviews every step: the whole stream is one seeded corpus, sliced into batches.
    reviews = world.make_reviews(config.steps * config.batch_size, seed=config.seed)
    model.train()
    with _maybe_progress(progress, config.steps, done=start) as advance:
        for step in range(start, config.steps):
            texts = reviews[step * config.batch_size:(step + 1) * config.batch_size]
            input_ids, attention_mask, labels = make_batch(tokenizer, texts)  # (B, T) each
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, config)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            advance(loss.item())
            done = step + 1
            if checkpoint is not None and done % every == 0 and done < config.steps:
                _save_progress(checkpoint, {
                    "config": asdict(config), "tokenizer": tokenizer_digest, "step": done,
                    "losses": losses, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                })
    model.eval()
    return model, tokenizer, losses


def _save_progress(path: Path, state: dict) -> None:
    """torch.save of `state` behind its SHA-256, written atomically: a kill leaves the previous
    save or this one, and a file damaged later is recognised rather than resumed from."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def _read_progress(path: Path, config: PretrainConfig, tokenizer_digest: str,
                   echo: Echo) -> dict | None:
    """The state `_save_progress` wrote to `path`, if it is whole and from this very training;
    otherwise None, after a one-line note of why it is not used."""
    if not path.is_file():
        return None
    try:
        digest, _, payload = path.read_bytes().partition(b"\n")
        if hashlib.sha256(payload).hexdigest().encode() != digest:
            raise ValueError("its checksum does not match its contents")
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"config", "tokenizer", "step", "losses", "model",
                                               "optimizer", "rng"} <= state.keys():
            raise ValueError("entries are missing")
        if not (isinstance(state["step"], int) and 0 < state["step"] < config.steps
                and len(state["losses"]) == state["step"]):
            raise ValueError(f"step {state['step']!r} does not fit {config.steps} steps")
    except Exception as e:  # any damage: unreadable, truncated, not torch's format, wrong shape
        echo(f"ignored {path}, a damaged partial pi_sft checkpoint ({_first_line(e)}); training "
             "pi_sft from the start")
        return None
    if state["config"] != asdict(config) or state["tokenizer"] != tokenizer_digest:
        echo(f"ignored {path}: it is the partial training of a pi_sft with other settings (or "
             "another tokenizer); training pi_sft from the start")
        return None
    return state


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def pretrain_sft(out: str | Path, config: PretrainConfig = FULL, progress: bool = False,
                 echo: Echo = print, every: int = CHECKPOINT_EVERY) -> dict:
    """Train pi_sft and save it into `out`; returns the summary also written to pretrain.json.

    A training an earlier call was stopped in resumes from its last save in `out` (`echo` says
    so); `seconds` is then this call's time only.
    """
    out = Path(out)
    start = time.perf_counter()
    model, tokenizer, losses = train_sft(config, progress, out / PROGRESS_FILE, every, echo)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    for key, value in special_token_ids(tokenizer).items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {
        "config": asdict(config), "seconds": round(seconds, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": statistics.mean(losses[-10:]), "losses": losses,
    }
    # Atomic: pretrain.json marks pi_sft complete, and a rerun reads it, so a kill or a full disk
    # must not leave an empty or half one (which the rerun could not parse).
    write_text_atomic(out / "pretrain.json", json.dumps(summary, indent=1))
    # Only now: a stop before pretrain.json resumes from it (one after leaves it, which the
    # demo's rerun deletes as it keeps this pi_sft).
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    return summary


def reward_spread(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 48, seed: int = 0,
    batch_size: int = 32,
) -> dict:
    """Sample two responses per prompt at temperature 1 and describe their latent rewards.

    `pair_differs` is the share of pairs whose rewards differ by more than 0.5, i.e. pairs whose
    Bradley-Terry label is not a near coin flip: what makes a preference data set informative.
    """
    from preftune.sampling import sample_pairs

    records = sample_pairs(
        model, tokenizer, prompts, n=2, max_new_tokens=max_new_tokens, seed=seed,
        batch_size=batch_size,
    )
    pairs = [[world.sentiment_reward(r["prompt"], y) for y in r["responses"]] for r in records]
    rewards = [x for pair in pairs for x in pair]
    return {
        "samples": len(rewards),
        "mean": statistics.mean(rewards),
        "std": statistics.pstdev(rewards),
        "positive": sum(x > 0 for x in rewards) / len(rewards),
        "negative": sum(x < 0 for x in rewards) / len(rewards),
        "pair_differs": sum(abs(a - b) > 0.5 for a, b in pairs) / len(pairs),
        "mean_abs_pair_gap": statistics.mean(abs(a - b) for a, b in pairs),
        "examples": [r["prompt"] + r["responses"][0] for r in records[:5]],
    }


@contextmanager
def _maybe_progress(enabled: bool, total: int, done: int = 0) -> Iterator[Callable[[float], None]]:
    """Yields `advance(loss)` for a rich bar over training steps showing the loss, or a no-op;
    `done` steps (of a resumed training) are shown as finished."""
    if not enabled:
        yield lambda loss: None
        return
    from rich.progress import Progress, TextColumn

    columns = (*Progress.get_default_columns(), TextColumn("loss {task.fields[loss]}"))
    with Progress(*columns) as bar:
        task = bar.add_task("training pi_sft", total=total, completed=done, loss="-")
        yield lambda loss: bar.update(task, advance=1, loss=f"{loss:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the demo's pi_sft and measure its spread.")
    parser.add_argument("--out", required=True, help="folder for the model and tokenizer")
    parser.add_argument("--quick", action="store_true", help="the small test-size preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", type=int, default=100, help="held-out prompts to sample")
    # One thread by default: these models are too small to gain much from two (41 s vs 64 s
    # at full size on an idle 2-core machine), and when another process holds a core, OpenMP
    # threads spinning at barriers for each other make training up to 10x slower.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = replace(QUICK if args.quick else FULL, seed=args.seed)
    summary = pretrain_sft(args.out, config, progress=True)
    print(f"trained in {summary['seconds']:.1f}s, {summary['parameters']} parameters, "
          f"final loss {summary['final_loss']:.3f}")
    if args.measure:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.out)
        tokenizer = AutoTokenizer.from_pretrained(args.out)
        start = time.perf_counter()
        spread = reward_spread(model, tokenizer, world.make_prompts(args.measure, "heldout"))
        spread["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(spread, indent=1))


if __name__ == "__main__":
    main()
