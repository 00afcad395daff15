"""Forward + backward time of the LM-head stage under each of LinearTokenLogps' saving strategies.

    .venv/bin/python bench/head_strategies.py                 # 2,048 tokens, hidden 256, V 32,000
    .venv/bin/python bench/head_strategies.py --frozen-head   # as under LoRA: only grad_hidden

Each strategy runs `--repeats` times in two alternating rounds on one torch thread; the best
time of each is printed. HIDDEN_GRAD applies only when the head is frozen.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from preftune.logprobs import HIDDEN_GRAD, KEEP_LOGITS, RECOMPUTE, LinearTokenLogps


def time_strategy(strategy: str, head: nn.Linear, targets, upstream, hidden_size: int, chunk: int) -> float:
    hidden = torch.randn(targets.shape[0], hidden_size, requires_grad=True)
    started = time.perf_counter()
    token_logps = LinearTokenLogps.apply(hidden, head.weight, None, targets, chunk, strategy)
    (token_logps * upstream).sum().backward()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--frozen-head", action="store_true", help="the head takes no gradient (LoRA)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    head = nn.Linear(args.hidden, args.vocab, bias=False).requires_grad_(not args.frozen_head)
    targets = torch.randint(0, args.vocab, (args.tokens,))
    upstream = torch.randn(args.tokens)
    strategies = [RECOMPUTE, KEEP_LOGITS] + ([HIDDEN_GRAD] if args.frozen_head else [])
    best = {s: float("inf") for s in strategies}
    for order in (strategies, strategies[::-1]):
        for strategy in order:
            for _ in range(args.repeats):
                best[strategy] = min(best[strategy], time_strategy(strategy, head, targets, upstream,
                                                                   args.hidden, args.chunk))
    for strategy, seconds in best.items():
        print(f"{strategy:<12} {seconds * 1000:8.0f} ms  ({best[RECOMPUTE] / seconds:.2f}x recompute)")


if __name__ == "__main__":
    main()
