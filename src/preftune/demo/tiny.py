"""Tiny tokenizers and causal LMs built in-process, so tests and the demo never download.

A byte-level BPE tokenizer is trained with `tokenizers` on a handful of lines (byte level means
every string round-trips, whatever unicode it holds), and a transformers model of the requested
family is built from a config with random weights. `save_tiny_model` writes both into a folder
that `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` read like any hub
checkpoint, so the loading code under test is the real one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

# A minimal chat template: every message is "<|role|>\ncontent<|eos|>\n"; the generation prompt
# opens the assistant turn. Enough to exercise conversational data end to end.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|eos|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the best ice cream? Haagen-Dazs is rich and creamy.",
    "A preference pair holds a prompt, a chosen answer and a rejected answer.",
    "Direct preference optimization trains a policy against a frozen reference.",
    "Numbers like 12, 345 and 6789 appear in text too; so do commas, colons: and dashes -.",
    "user assistant system: hello, how can I help you today?",
]


def train_tokenizer(texts: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer and wrap it as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


# The model families build_model makes (`preftune make-tiny-model --arch`).
FAMILIES = ("llama", "qwen2", "gpt2")


def build_model(
    arch: str,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    tie_embeddings: bool = False,
    seed: int = 0,
    special_ids: dict | None = None,
):
    """A randomly initialised causal LM of family `arch` ("llama", "qwen2" or "gpt2")."""
    import transformers

    special_ids = special_ids or {}
    intermediate_size = intermediate_size or 4 * hidden_size
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
            n_positions=max_positions, n_inner=intermediate_size,
            tie_word_embeddings=tie_embeddings, **special_ids,
        )
    elif arch in ("llama", "qwen2"):
        cls = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
        config = cls(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
            intermediate_size=intermediate_size, max_position_embeddings=max_positions,
            tie_word_embeddings=tie_embeddings, **special_ids,
        )
    else:
        raise ValueError(f"unknown tiny model family {arch!r}: use llama, qwen2 or gpt2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model


def special_token_ids(tokenizer) -> dict:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def save_tiny_model(
    folder: str | Path,
    arch: str = "llama",
    texts: Iterable[str] = DEFAULT_CORPUS,
    vocab_size: int = 512,
    seed: int = 0,
    **model_kwargs,
) -> Path:
    """Build a tokenizer and a model and save both where `from_pretrained` can load them."""
    folder = Path(folder)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    model = build_model(
        arch, vocab_size=len(tokenizer), seed=seed,
        special_ids=special_token_ids(tokenizer), **model_kwargs,
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
