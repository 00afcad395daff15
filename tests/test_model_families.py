"""Model families and tokenizers as they come from the Hub, built in-process (no downloads).

The tiny tokenizer of `preftune.demo.tiny` adds no special tokens and has a pad token; real ones
differ: GPT-2 has no pad token and BOS == EOS, Llama / Mistral / Gemma tokenizers put BOS in front
of every text and their chat templates write one too, some fine-tunes append EOS to every text.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from preftune.data.schema import PreferencePair
from preftune.data.tokenize import tokenize_pair
from preftune.demo.tiny import DEFAULT_CORPUS
from preftune.errors import UserError
from preftune.sampling import encode_prompts

MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}"
                    "{% endif %}{% endfor %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' "
                  "else m['role']) + '\n' + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")

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


# ------------------------------------------------------------------ families end to end

# family: (config class, tokenizer kind, tied embeddings, extra config)
FAMILIES = {
    "gpt2": ("GPT2Config", "gpt2", True, {}),
    "mistral": ("MistralConfig", "llama", False, {"sliding_window": None}),
    "phi3": ("Phi3Config", "llama", False, {}),
    "gemma2": ("Gemma2Config", "gemma", True, {"head_dim": 8}),
    "gemma": ("GemmaConfig", "gemma", True, {"head_dim": 8}),  # embeddings scaled by sqrt(hidden)
    "gpt_neox": ("GPTNeoXConfig", "gpt2", False, {}),  # parallel residual, rotary on part of each head
}


def family_model(family: str, tokenizer, seed: int = 0):
    config_class, _, tied, extra = FAMILIES[family]
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4,
                                         n_positions=128, tie_word_embeddings=tied, **ids)
    else:
        config = getattr(transformers, config_class)(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
            tie_word_embeddings=tied, **ids, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def family_folder(tmp_path_factory):
    """family -> a folder holding a saved random model and its Hub-like tokenizer (unmodified:
    GPT-2's and Mistral's have no pad token)."""
    made = {}

    def make(family):
        if family not in made:
            tokenizer = family_tokenizer(FAMILIES[family][1])
            folder = tmp_path_factory.mktemp(family)
            family_model(family, tokenizer).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            made[family] = folder
        return made[family]

    return make


def test_padded_packed_and_prompt_shared_logps_equal_full_logits_on_other_families(tokenizers):
    from preftune.data.collate import collate_pairs, pack_pairs
    from preftune.data.shared_prompt import collate_shared_prompt
    from preftune.logprobs import completion_logps, naive_completion_logps, shared_prompt_logps
    from preftune.packing import prompt_sharing_is_exact

    texts = [PreferencePair("Question: What is the best ice cream?\nAnswer:", " Haagen-Dazs.", " GB"),
             PreferencePair("The quick brown fox", " jumps over the lazy dog.", " sleeps.")]
    for family, (_, kind, _, _) in FAMILIES.items():
        tokenizer = tokenizers[kind]
        model = family_model(family, tokenizer).eval()
        pairs = [tokenize_pair(p, tokenizer, i) for i, p in enumerate(texts)]
        padded = collate_pairs(pairs, tokenizer.pad_token_id)
        with torch.no_grad():  # the model's own logits, log-softmaxed whole
            expected, _ = naive_completion_logps(model, padded.input_ids, padded.attention_mask,
                                                 padded.completion_mask)
        got, _ = completion_logps(model, padded.input_ids, padded.attention_mask, padded.completion_mask)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5, msg=f"{family} padded")
        packed = pack_pairs(pairs)
        got, _ = completion_logps(model, packed.input_ids, None, packed.completion_mask,
                                  position_ids=packed.position_ids, sequence_ids=packed.sequence_ids)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5, msg=f"{family} packed")
        if prompt_sharing_is_exact(model, torch.device("cpu"), model.config.vocab_size):
            shared, _ = shared_prompt_logps(model, collate_shared_prompt(pairs, tokenizer.pad_token_id).shared)
            torch.testing.assert_close(shared, expected, atol=1e-4, rtol=1e-5, msg=f"{family} prompt-shared")
        else:
            assert family == "gemma2"  # soft-capped logits: see the next test


def test_prompt_sharing_is_refused_for_soft_capped_logits_even_when_they_are_small(tokenizers):
    # Gemma 2 soft-caps its logits (30 tanh(x / 30)); the shared layout applies the bare LM head.
    # At random initialisation the logits are tiny, the cap changes them by less than the
    # probe's tolerance, and only knowing the model refuses the layout; with a trained model's
    # logits the two differ by far more.
    from preftune.data.collate import collate_pairs
    from preftune.data.shared_prompt import collate_shared_prompt
    from preftune.logprobs import completion_logps, shared_prompt_logps
    from preftune.packing import prompt_sharing_is_exact

    tokenizer = tokenizers["gemma"]
    model = family_model("gemma2", tokenizer).eval()
    assert not prompt_sharing_is_exact(model, torch.device("cpu"), model.config.vocab_size)
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)  # logits of a trained model's size
    pairs = [tokenize_pair(PreferencePair("The quick brown", " fox.", " dog."), tokenizer)]
    padded = collate_pairs(pairs, tokenizer.pad_token_id)
    expected, _ = completion_logps(model, padded.input_ids, padded.attention_mask, padded.completion_mask)
    shared, _ = shared_prompt_logps(model, collate_shared_prompt(pairs, tokenizer.pad_token_id).shared)
    assert (shared - expected).abs().max() > 1.0


@pytest.mark.parametrize("config_class, extra", [
    ("MistralConfig", {}), ("Gemma3TextConfig", {"head_dim": 8, "layer_types": ["sliding_attention", "full_attention"]}),
    ("Qwen2Config", {"use_sliding_window": True, "max_window_layers": 0}),
])
def test_prompt_sharing_is_refused_for_sliding_window_attention(tokenizers, config_class, extra):
    # A window of 8 here; Gemma 3 270M's is 512. The start-up probe's sequences fit in any
    # window, so it passed; then a pair whose prompt and chosen response outran the window
    # stopped training with a RuntimeError from the cache's crop, and prompts of unlike lengths
    # gave the rejected responses other log-probs (the padding after a short prompt filled the
    # window). Packing keeps each sequence's slots together, so it stays exact.
    from preftune.config import validate_config
    from preftune.data.collate import collate_pairs, pack_pairs
    from preftune.logprobs import completion_logps, naive_completion_logps
    from preftune.packing import choose_collate

    tokenizer = tokenizers["gemma"]
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128, sliding_window=8,
        pad_token_id=tokenizer.pad_token_id, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    cfg = validate_config({"model": {"path": "x"}, "data": {"train": "x", "packing": "off", "share_prompt": True}})
    assert choose_collate(cfg, model, tokenizer.pad_token_id, torch.device("cpu")).func is collate_pairs

    texts = [PreferencePair("Question: What is the best ice cream?\nAnswer:", " Haagen-Dazs.", " GB"),
             PreferencePair("The quick brown fox", " jumps over the lazy dog.", " sleeps.")]
    pairs = [tokenize_pair(p, tokenizer, i) for i, p in enumerate(texts)]
    padded = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        expected, _ = naive_completion_logps(model, padded.input_ids, padded.attention_mask, padded.completion_mask)
        packed = pack_pairs(pairs)
        got, _ = completion_logps(model, packed.input_ids, None, packed.completion_mask,
                                  position_ids=packed.position_ids, sequence_ids=packed.sequence_ids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_packing_is_refused_with_a_warning_for_a_model_that_mixes_packed_rows(tokenizers):
    # OPT takes no position ids from the caller: packed sequences would attend to each other.
    from preftune.config import validate_config
    from preftune.data.collate import collate_pairs
    from preftune.packing import choose_collate

    config = transformers.OPTConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    ffn_dim=64, word_embed_proj_dim=32)
    model = transformers.AutoModelForCausalLM.from_config(config)
    cfg = validate_config({"model": {"path": "x"}, "data": {"train": "x", "packing": "on", "share_prompt": False}})
    with pytest.warns(UserWarning, match="OPTForCausalLM with attention .* does not keep packed sequences apart"):
        collate = choose_collate(cfg, model, 0, torch.device("cpu"))
    assert collate.func is collate_pairs


@pytest.mark.parametrize("family, layout", [("gpt2", "text"), ("mistral", "rendered"), ("gemma2", "messages")])
def test_train_eval_and_sample_a_family_as_downloaded(tmp_path, family_folder, one_torch_thread, family, layout):
    import math

    from preftune_test_data import PAIRS, make_config, read_metrics, write_jsonl

    from preftune.data.io import load_pairs
    from preftune.evaluate import evaluate_pairs_file
    from preftune.sampling import load_model_and_tokenizer, sample_pairs
    from preftune.train import train

    folder = family_folder(family)
    original = transformers.AutoTokenizer.from_pretrained(folder)
    rows = PAIRS if layout == "text" else [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in PAIRS]
    if layout == "rendered":  # prompts stored as text already rendered by the chat template, BOS and all
        rows = [{"prompt": original.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
                 "chosen": r["chosen"][0]["content"], "rejected": r["rejected"][0]["content"]} for r in rows]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    train(make_config(tmp_path, folder, data, train={"max_steps": 1}))
    assert read_metrics(tmp_path / "run")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)

    # The vocabulary and the embeddings are the user's: a missing pad token is EOS, not a new token.
    final = tmp_path / "run" / "final"
    model, tokenizer = load_model_and_tokenizer(str(final), device="cpu")
    assert len(tokenizer) == len(original) == model.get_input_embeddings().num_embeddings
    assert tokenizer.pad_token_id == (original.pad_token_id if original.pad_token else original.eos_token_id)

    # Evaluation tokenizes as training did: one BOS at most, one EOS closing each text completion.
    original.pad_token = original.pad_token or original.eos_token
    expected = [tokenize_pair(p, original) for p in load_pairs(str(data)).pairs]
    for pair in expected:
        assert pair.prompt_ids.count(original.bos_token_id) == (family != "gpt2")
        assert pair.chosen_ids.count(original.eos_token_id) == (layout != "messages")  # templates close turns
    record = evaluate_pairs_file(final, data, device="cpu")
    assert record["n_pairs"] == len(PAIRS)
    assert record["eval/lengths/chosen"] == pytest.approx(sum(len(p.chosen_ids) for p in expected) / len(expected))

    # Sampling renders the same prompt ids (chat prompts with their one BOS) and stops at EOS.
    prompts = [r["prompt"] for r in rows[:2]]
    records = sample_pairs(model, tokenizer, prompts, n=2, max_new_tokens=4, seed=0)
    assert [len(r["responses"]) for r in records] == [2, 2]
    ids, _ = encode_prompts(tokenizer, prompts[:1])
    assert ids[0].tolist() == expected[0].prompt_ids


def test_sampling_stops_at_the_tokenizers_eos_when_the_model_config_names_another(tokenizers):
    # A chat fine-tune whose tokenizer closes texts with <end_of_turn> (training appended it to
    # every completion) while its config.json still says <eos>: the model ends its response with
    # <end_of_turn>. Sampling ran on past it, wrote what followed as the response and marked it
    # cut by max_new_tokens.
    import copy

    from preftune.sampling import generate_token_ids, sample_pairs
    from preftune.sampling_settings import SamplingSettings

    tokenizer = copy.deepcopy(tokenizers["gemma"])
    model = family_model("mistral", tokenizer).eval()
    greedy = SamplingSettings(temperature=0, max_new_tokens=6, n=1)
    first = generate_token_ids(model, tokenizer, ["The quick brown fox"], [0], greedy)[1][0][0][0]
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    with torch.no_grad():  # <end_of_turn> outscores the token the model would write first
        model.lm_head.weight[end_of_turn] = 3 * model.lm_head.weight[first]
    tokenizer.eos_token = "<end_of_turn>"
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<eos>")
    _, rows = generate_token_ids(model, tokenizer, ["The quick brown fox"], [0], greedy)
    assert rows == [[[end_of_turn]]]
    record = sample_pairs(model, tokenizer, ["The quick brown fox"], n=1, temperature=0, max_new_tokens=6)[0]
    assert record["responses"] == [""] and record["truncated"] == [False]


def test_sampling_of_a_chat_prompt_stops_where_the_chat_template_closes_the_turn(tokenizers):
    # A chat fine-tune of a base model (Qwen2.5, Llama 3) keeps the base's EOS in its tokenizer and
    # config.json, while its chat template, which training renders every chat completion with,
    # closes a turn with a special token of its own (<end_of_turn> here, <|im_end|> for Qwen): the
    # model ends its answer there. Sampling ran on past it into a turn of its own invention, and
    # marked the response cut by max_new_tokens, so training never saw the end of turn either.
    from preftune.sampling import generate_token_ids, sample_pairs
    from preftune.sampling_settings import SamplingSettings

    tokenizer = tokenizers["gemma"]
    model = family_model("mistral", tokenizer).eval()
    chat = [{"role": "user", "content": "The quick brown fox"}]
    greedy = SamplingSettings(temperature=0, max_new_tokens=6, n=1)
    first = generate_token_ids(model, tokenizer, [chat], [0], greedy)[1][0][0][0]
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    with torch.no_grad():  # <end_of_turn> outscores the token the model would write first
        model.lm_head.weight[end_of_turn] = 3 * model.lm_head.weight[first]
    assert tokenizer.eos_token == "<eos>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    _, rows = generate_token_ids(model, tokenizer, [chat], [0], greedy)
    assert rows == [[[end_of_turn]]]
    record = sample_pairs(model, tokenizer, [chat], n=1, temperature=0, max_new_tokens=6)[0]
    assert record["responses"] == [""] and record["truncated"] == [False]


def test_sampling_keeps_a_key_value_cache_when_config_json_turns_it_off(tmp_path, tokenizers):
    # Fine-tunes saved after gradient checkpointing say "use_cache": false in config.json; with no
    # generation_config.json, generate took that up and ran every step over the whole sequence.
    from preftune.sampling import load_model_and_tokenizer, sample_pairs

    tokenizer = tokenizers["llama"]
    model = family_model("mistral", tokenizer)
    model.config.use_cache = False
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    model, tokenizer = load_model_and_tokenizer(str(tmp_path), device="cpu")
    assert model.generation_config.use_cache is False
    widths = []
    model.model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                          with_kwargs=True)
    record = sample_pairs(model, tokenizer, ["The quick brown fox"], n=1, temperature=0, max_new_tokens=4)[0]
    assert widths[1:] == [1] * (len(widths) - 1) and len(widths) == 4 and record["truncated"] == [True]


def test_a_chat_template_that_refuses_a_conversation_names_the_row_or_prompt(tokenizers):
    # Gemma's and Mistral's templates raise on a system turn or turns that do not alternate.
    import copy

    tokenizer = copy.deepcopy(tokenizers["gemma"])
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               "{{ m['content'] }}{% endfor %}")
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"}]
    pair = PreferencePair(system, [{"role": "assistant", "content": "Blue."}],
                          [{"role": "assistant", "content": "Red."}], origin="d.jsonl, line 3")
    with pytest.raises(UserError, match=r"^d.jsonl, line 3: the tokenizer's chat template refuses these "
                                        r"messages \(roles: system, user\): System role not supported;"):
        tokenize_pair(pair, tokenizer)
    with pytest.raises(UserError, match=r"^prompt 7 \(counting from 0.*System role not supported"):
        encode_prompts(tokenizer, ["Sky?", system], indices=[6, 7])
