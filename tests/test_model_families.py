"""Model families and tokenizers as they come from the Hub, built in-process (no downloads).

The tiny tokenizer of `preftune.demo.tiny` adds no special tokens and has a pad token; real ones
differ: GPT-2 has no pad token and BOS == EOS, Llama / Mistral / Gemma tokenizers put BOS in front
of every text and their chat templates write one too, some fine-tunes append EOS to every text.
"""

from __future__ import annotations

import pytest
import transformers

from preftune.data.schema import PreferencePair
from preftune.data.tokenize import tokenize_pair
from preftune.demo.tiny import DEFAULT_CORPUS
from preftune.sampling import encode_prompts

MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}"
                    "{% endif %}{% endfor %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] "
                  "+ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}"
                  "{% endif %}")

# kind: (special tokens, named specials, BOS/EOS the tokenizer adds itself, chat template)
TOKENIZERS = {
    "gpt2": (["<|endoftext|>"], {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, "", None),
    "llama": (["<unk>", "<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
              "<s> $A", MISTRAL_TEMPLATE),
    "llama-add-eos": (["<unk>", "<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
                      "<s> $A </s>", MISTRAL_TEMPLATE),
    "gemma": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
              {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, "<bos> $A", GEMMA_TEMPLATE),
}


def family_tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, named, adds, template = TOKENIZERS[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(DEFAULT_CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if adds:
        ids = [(t, tok.token_to_id(t)) for t in specials if t in adds.split()]
        tok.post_processor = processors.TemplateProcessing(single=adds, pair=f"{adds} $B", special_tokens=ids)
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    wrapped.chat_template = template
    return wrapped


@pytest.fixture(scope="module")
def tokenizers():
    made = {kind: family_tokenizer(kind) for kind in TOKENIZERS}
    for tokenizer in made.values():
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # as load_tokenizer does
    return made


# ------------------------------------------------------------------ BOS and EOS


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_a_text_prompt_rendered_by_the_chat_template_keeps_one_bos(tokenizers, kind):
    # Data sets often store prompts already rendered with the chat template, BOS included; a
    # tokenizer that adds BOS must not put a second one in front, in training or in sampling.
    tokenizer = tokenizers[kind]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fast animal."}],
                                             tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(tokenizer.bos_token)
    pair = tokenize_pair(PreferencePair(rendered, " The cheetah.", " A snail."), tokenizer)
    assert pair.prompt_ids[:2].count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(pair.prompt_ids) == rendered
    ids, mask = encode_prompts(tokenizer, [rendered])
    assert ids[0].tolist() == pair.prompt_ids
    # A plain text still gets the tokenizer's BOS, once.
    plain = tokenize_pair(PreferencePair("Question: sky?", " Blue.", " Red."), tokenizer)
    assert plain.prompt_ids[0] == tokenizer.bos_token_id != plain.prompt_ids[1]
    assert encode_prompts(tokenizer, ["Question: sky?"])[0][0].tolist() == plain.prompt_ids


@pytest.mark.parametrize("kind", ["gpt2", "llama", "llama-add-eos", "gemma"])
def test_every_text_completion_ends_with_exactly_one_eos(tokenizers, kind):
    # Whether the completion text brings its own EOS token (as TRL's add_eos checks for), or the
    # tokenizer appends one to every text, the completion ends with one EOS, not two.
    tokenizer = tokenizers[kind]
    eos = tokenizer.eos_token_id
    for chosen, rejected in ((" Blue.", " Red."), (" Blue." + tokenizer.eos_token, " Red." + tokenizer.eos_token)):
        pair = tokenize_pair(PreferencePair("Question: sky?", chosen, rejected), tokenizer)
        for ids in (pair.chosen_ids, pair.rejected_ids):
            assert ids[-1] == eos and ids[-2] != eos, (chosen, tokenizer.decode(ids))
        assert tokenizer.decode(pair.chosen_ids, skip_special_tokens=True) == " Blue."
        assert eos not in pair.prompt_ids or tokenizer.bos_token_id == eos


def test_a_sampling_prompt_does_not_end_with_the_eos_a_tokenizer_appends(tokenizers):
    tokenizer = tokenizers["llama-add-eos"]
    assert tokenizer("Question: sky?")["input_ids"][-1] == tokenizer.eos_token_id
    ids, _ = encode_prompts(tokenizer, ["Question: sky?"])
    assert ids[0, 0] == tokenizer.bos_token_id and ids[0, -1] != tokenizer.eos_token_id
