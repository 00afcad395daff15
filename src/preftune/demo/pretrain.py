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

Run it alone with `python -m preftune.demo.pretrain --out runs/pi_sft [--quick]`.
"""

from __future__ import annotations

import argparse
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
from preftune.records import write_text_atomic

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips (padding here)


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


def train_sft(config: PretrainConfig = FULL, progress: bool = False):
    """Train a tokenizer and a model on world reviews; returns (model, tokenizer, losses)."""
    tokenizer = train_tokenizer(
        world.make_reviews(config.tokenizer_reviews, seed=config.seed + 1),
        vocab_size=config.vocab_size,
    )
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
    # Fresh reviews every step: the whole stream is one seeded corpus, sliced into batches.
    reviews = world.make_reviews(config.steps * config.batch_size, seed=config.seed)
    losses = []
    model.train()
    with _maybe_progress(progress, config.steps) as advance:
        for step in range(config.steps):
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
    model.eval()
    return model, tokenizer, losses


def pretrain_sft(out: str | Path, config: PretrainConfig = FULL, progress: bool = False) -> dict:
    """Train pi_sft and save it into `out`; returns the summary also written to pretrain.json."""
    start = time.perf_counter()
    model, tokenizer, losses = train_sft(config, progress)
    seconds = time.perf_counter() - start
    out = Path(out)
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
def _maybe_progress(enabled: bool, total: int) -> Iterator[Callable[[float], None]]:
    """Yields `advance(loss)` for a rich bar over training steps showing the loss, or a no-op."""
    if not enabled:
        yield lambda loss: None
        return
    from rich.progress import Progress, TextColumn

    columns = (*Progress.get_default_columns(), TextColumn("loss {task.fields[loss]}"))
    with Progress(*columns) as bar:
        task = bar.add_task("training pi_sft", total=total, loss="-")
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
