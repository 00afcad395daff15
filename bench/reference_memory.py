"""Memory of frozen weights under bf16 autocast: a frozen reference copy
or LoRA's frozen base (reference.compact_frozen_linears), float32 as
loaded and with their linear layers in bf16 as preftune keeps them, at the Qwen2.5-0.5B and
Qwen2.5-7B shapes.

    .venv/bin/python bench/reference_memory.py

The models are built on the meta device: shapes only, nothing allocated or downloaded.
"""

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from preftune.reference import compactable_linears

SHAPES = {
    "Qwen2.5-0.5B": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-7B": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}


def main() -> None:
    for name, shape in SHAPES.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(Qwen2Config(**shape)).requires_grad_(False)
        linear = sum(p.numel() for m in compactable_linears(model) for p in m.parameters())
        total = sum(p.numel() for p in model.parameters())
        print(f"{name}: parameters {total / 1e6:.1f}M, of them in bf16-stored linears {linear / 1e6:.1f}M; "
              f"frozen weights (reference copy or LoRA base): float32 {total * 4 / 2**30:.2f} GiB, "
              f"linears in bf16 {(total * 4 - linear * 2) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
