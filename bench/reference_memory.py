"""Memory of the frozen reference copy at the Qwen2.5-0.5B shape: float32, and with its linear
layers in bf16 as preftune keeps them under bf16 autocast (reference.compact_reference).

    .venv/bin/python bench/reference_memory.py

The model is built on the meta device: shapes only, nothing allocated or downloaded.
"""

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from preftune.reference import compactable_linears


def main() -> None:
    config = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(p.numel() for m in compactable_linears(model) for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    print(f"parameters {total / 1e6:.1f}M, of them in bf16-stored linears {linear / 1e6:.1f}M")
    print(f"reference copy: float32 {total * 4 / 2**30:.2f} GiB, "
          f"linears in bf16 {(total * 4 - linear * 2) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
