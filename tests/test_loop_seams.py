"""The seams of the loop: what `preftune sample` wrote is what `label auto` passes on and what
training scores, token for token (prompt, response, and an EOS only where the model chose one)."""

import json

import pytest
import torch

from preftune.data.io import load_pairs as load_training_pairs
from preftune.data.tokenize import tokenize_pair
from preftune.errors import UserError
from preftune.labeling.auto import label_auto
from preftune.labeling.export import as_triplet
from preftune.labeling.pairs import load_pairs
from preftune.sampling import (
    SamplingSettings,
    generate_token_ids,
    load_model_and_tokenizer,
    sample_to_file,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=5, seed=0, n=2)
TEXT_PROMPTS = ["The quick brown fox", "Hi", "What is the best ice cream?", "hello",
                "Numbers like 12", "A preference pair"]


@pytest.fixture(scope="module")
def eos_model_dir(tmp_path_factory):
    """A tiny model whose EOS logit is raised along its mean hidden state, so that about half
    of its 5-token responses end with EOS and the rest are cut by max_new_tokens."""
    from preftune.demo.tiny import DEFAULT_CORPUS, save_tiny_model

    folder = save_tiny_model(tmp_path_factory.mktemp("tiny-eos"), hidden_size=32)
    model, tokenizer = load_model_and_tokenizer(str(folder))
    with torch.no_grad():
        batch = tokenizer(DEFAULT_CORPUS[:3], return_tensors="pt", padding=True)
        mean = model.model(**batch).last_hidden_state.mean((0, 1))  # (H,)
        model.lm_head.weight[tokenizer.eos_token_id] = 6 * mean / mean.norm() ** 2
    model.save_pretrained(folder)
    return folder


def _write_prompts(path, chat: bool):
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(TEXT_PROMPTS):
            prompt = text
            if chat:
                prompt = [{"role": "user", "content": text}]
                if i % 2 == 0:
                    prompt = [{"role": "system", "content": "Be brief."}, *prompt]
            f.write(json.dumps({"prompt": prompt}) + "\n")
    return path


@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_training_scores_the_tokens_the_sampler_drew(eos_model_dir, tmp_path, chat):
    prompts_file = _write_prompts(tmp_path / "prompts.jsonl", chat)
    sample_to_file(str(eos_model_dir), prompts_file, tmp_path / "pairs.jsonl", SETTINGS,
                   batch_size=4, progress=False)
    label_auto(tmp_path / "pairs.jsonl", lambda p, r: [float(len(x)) for x in r], tmp_path / "D.jsonl",
               mode="argmax", show_progress=False)
    # The ids the sampler drew (seeded per prompt, so the same whatever the batching).
    model, tokenizer = load_model_and_tokenizer(str(eos_model_dir))
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    prompt_ids, rows = generate_token_ids(model, tokenizer, prompts, list(range(len(prompts))), SETTINGS)
    eos = tokenizer.eos_token_id
    seen = {"cut": 0, "ended": 0}
    for pair in load_training_pairs(str(tmp_path / "D.jsonl")).pairs:
        i = int(pair.pair_id[1:])
        tokenized = tokenize_pair(pair, tokenizer)
        assert tokenized.prompt_ids == prompt_ids[i]
        winner = pair.metadata["chosen_index"]
        for drawn, trained, text in ((rows[i][winner], tokenized.chosen_ids, pair.chosen),
                                     (rows[i][1 - winner], tokenized.rejected_ids, pair.rejected)):
            text = text[-1]["content"] if chat else text
            body = trained[:trained.index(eos)] if eos in trained else trained
            # A random model draws token sequences BPE would merge otherwise: the text is the same.
            assert tokenizer.decode(body) == text
            ended = drawn[-1] == eos
            seen["ended" if ended else "cut"] += 1
            # Cut by max_new_tokens: no EOS the model never chose. Ended: its EOS, once (a chat
            # template may close its turn after it).
            assert trained.count(eos) == int(ended)
            assert not ended or trained[len(body)] == eos and (chat or trained[-1] == eos)
    assert seen["cut"] and seen["ended"], seen  # both kinds were checked


def test_truncated_marks_go_from_pairs_to_rows_and_are_checked(tmp_path):
    pair = {"prompt": [{"role": "user", "content": "Hi"}], "responses": ("a b", "c d"),
            "truncated": (True, False)}
    row = as_triplet("p1", pair, winner=1)
    assert row["rejected_truncated"] is True and "chosen_truncated" not in row
    assert "chosen_truncated" not in as_triplet("p1", {**pair, "truncated": (False, False)}, 0)

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"pair_id": "a", "prompt": "p", "responses": ["x", "y"], "truncated": [true]}\n')
    with pytest.raises(UserError, match=r"pairs.jsonl, line 1: 'truncated' must be a list"):
        load_pairs(pairs)

    data = tmp_path / "D.jsonl"
    data.write_text('{"prompt": "p", "chosen": " x", "rejected": " y"}\n'
                    '{"prompt": "p", "chosen": " x", "rejected": " y", "chosen_truncated": "yes"}\n')
    with pytest.raises(UserError, match=r"D.jsonl, line 2: field 'chosen_truncated' must be true or false"):
        load_training_pairs(str(data))


def test_a_cut_chat_response_must_be_the_assistants(tiny_llama, tmp_path):
    from preftune.sampling import load_model_and_tokenizer as load

    _, tokenizer = load(str(tiny_llama))
    data = tmp_path / "D.jsonl"
    data.write_text(json.dumps({
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "user", "content": "more"}],
        "rejected": [{"role": "assistant", "content": "hello"}], "chosen_truncated": True}) + "\n")
    pair = load_training_pairs(str(data)).pairs[0]
    with pytest.raises(UserError, match="line 1: a response marked truncated must end with an assistant"):
        tokenize_pair(pair, tokenizer)


def test_a_text_row_that_lost_its_prompt_is_named_not_trained_on(tmp_path):
    """Without its prompt, a row's implicit prompt is the shared start of its two responses
    (' was so' below): training on it would silently be training on another task."""
    data = tmp_path / "D.jsonl"
    data.write_text('{"prompt": "The film", "chosen": " was great.", "rejected": " was bad."}\n'
                    '{"chosen": " was so fine.", "rejected": " was so dull."}\n')
    with pytest.raises(UserError, match=r"D.jsonl, line 2: no 'prompt', while .*D.jsonl, line 1 has one"):
        load_training_pairs(str(data))
    data.write_text('{"chosen": "Q: hi A: yes.", "rejected": "Q: hi A: no."}\n' * 2)  # all implicit: fine
    assert [p.prompt for p in load_training_pairs(str(data)).pairs] == ["Q: hi A:"] * 2


def test_pairs_and_labeled_rows_given_to_the_wrong_step_say_which_step(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"pair_id": "p000000", "prompt": "p", "responses": [" x", " y"]}\n')
    with pytest.raises(UserError, match=r"pairs.jsonl, line 1: a pairs.jsonl row .* label the file first"):
        load_training_pairs(str(pairs))
    labeled = tmp_path / "D.jsonl"
    labeled.write_text('{"prompt": "p", "chosen": " x", "rejected": " y"}\n')
    with pytest.raises(UserError, match=r"D.jsonl, line 1: a labeled row \(chosen/rejected\), not a pair"):
        load_pairs(labeled)


def test_a_tokenizer_that_closes_every_text_with_eos_gives_the_sampler_s_prompt_ids(recwarn):
    """add_eos_token tokenizers end the prompt with EOS too; the sampler drops it (a prompt is
    not over), and training did so only through its 'tokens merging across the boundary' path,
    warning about every pair that its EOS counted as the start of the completions."""
    from tokenizers import processors

    from preftune.config import validate_config
    from preftune.data.schema import PreferencePair
    from preftune.data.tokenize import tokenize_pairs
    from preftune.demo.tiny import BOS, EOS, train_tokenizer
    from preftune.sampling import encode_prompts

    tokenizer = train_tokenizer()
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tokenizer.bos_token_id), (EOS, tokenizer.eos_token_id)])
    pairs = [PreferencePair("Question: What is two plus two?\nAnswer:", " Four.", " Seven."),
             PreferencePair("Hi", " there", " you", metadata={"chosen_truncated": True})]
    data_cfg = validate_config({"model": {"path": "m"}, "data": {"train": "d.jsonl"}}).data
    kept, _ = tokenize_pairs(pairs, tokenizer, data_cfg)
    assert not [w for w in recwarn if "tokenized prompt" in str(w.message)]
    eos = tokenizer.eos_token_id
    for pair, tokenized in zip(pairs, kept):
        assert tokenized.prompt_ids == encode_prompts(tokenizer, [pair.prompt])[0][0].tolist()
        assert tokenized.prompt_ids[-1] != eos
    assert kept[0].chosen_ids.count(eos) == 1 and kept[0].chosen_ids[-1] == eos  # once
    assert eos not in kept[1].chosen_ids and kept[1].rejected_ids[-1] == eos  # cut / ended


def _save_sentencepiece_style_model(folder):
    """A Llama with a Metaspace tokenizer, the way SentencePiece models (Llama 2, Mistral,
    Gemma) mark spaces: '▁word', and a decoder that drops the space opening a text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from preftune.demo.tiny import DEFAULT_CORPUS, build_model, special_token_ids

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    raw.train_from_iterator(DEFAULT_CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<unk>")
    model = build_model("llama", len(tokenizer), hidden_size=32, special_ids=special_token_ids(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_sentencepiece_response_keeps_the_space_that_opens_it(tmp_path):
    """Decoded alone, '▁Haagen' is 'Haagen': pairs.jsonl held 'What is the best ice
    cream?Haagen-Dazs is rich.', text the model never wrote, for training and the judge."""
    from preftune.sampling import _decode_until_stop

    folder = _save_sentencepiece_style_model(tmp_path / "sp")
    model, tokenizer = load_model_and_tokenizer(str(folder))
    prompt, answer = "What is the best ice cream?", " Haagen-Dazs is rich."
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(prompt + answer)["input_ids"][len(prompt_ids):]
    assert tokenizer.convert_ids_to_tokens(answer_ids)[0].startswith("▁")
    eos = [tokenizer.eos_token_id]
    assert _decode_until_stop(tokenizer, answer_ids + eos, eos, prompt_ids) == answer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the best ice cream?\nThe quick brown fox\n")
    sample_to_file(str(folder), prompts, tmp_path / "pairs.jsonl", SETTINGS, progress=False)
    drawn_ids, rows = generate_token_ids(model, tokenizer, ["What is the best ice cream?", "The quick brown fox"],
                                         [0, 1], SETTINGS)
    records = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    for record, head, row in zip(records, drawn_ids, rows):
        for text, ids in zip(record["responses"], row):
            ids = ids[:-1] if ids[-1] == tokenizer.eos_token_id else ids
            # prompt + response is the text the model wrote, its opening space included
            whole = tokenizer.decode(head + ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            assert record["prompt"] + text == whole
