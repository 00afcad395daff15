"""`preftune sample` and `preftune.sampling` on a tiny model built in-process."""

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from preftune.demo.tiny import save_tiny_model
from preftune.errors import UserError
from preftune.records import read_records
from preftune.sampling import (
    SamplingSettings,
    encode_prompts,
    filtered_probs,
    load_model_and_tokenizer,
    load_prompts,
    nucleus_probs,
    sample_pairs,
    sample_to_file,
)
from preftune.sampling_cli import app

PROMPTS = [
    "The quick brown fox", "Hi", "What is the best ice cream? Haagen-Dazs is",
    "A preference pair holds", "Numbers like 12", "Direct preference optimization trains",
    "hello",
]
SETTINGS = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=6, seed=0, n=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=32)


@pytest.fixture(scope="module")
def model_and_tokenizer(model_dir):
    return load_model_and_tokenizer(str(model_dir))


def write_txt(path, prompts):
    path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    return path


def run(model_dir, prompts_file, out, **kwargs):
    kwargs = {"settings": SETTINGS, "batch_size": 3, "progress": False, **kwargs}
    return sample_to_file(str(model_dir), prompts_file, out, **kwargs)


def test_records_follow_the_pairs_contract(model_dir, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert run(model_dir, write_txt(tmp_path / "p.txt", PROMPTS), out) == (0, len(PROMPTS))
    records = read_records(out)
    assert [r["pair_id"] for r in records] == [f"p{i:06d}" for i in range(len(PROMPTS))]
    for record, prompt in zip(records, PROMPTS):
        assert set(record) == {"pair_id", "prompt", "responses", "truncated", "model", "sampling"}
        assert len(record["truncated"]) == 2 and all(isinstance(t, bool) for t in record["truncated"])
        assert record["prompt"] == prompt
        assert record["model"] == str(model_dir)
        assert record["sampling"] == {
            "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, "seed": 0, "n": 2
        }
        assert len(record["responses"]) == 2
        assert all(isinstance(y, str) for y in record["responses"])


def test_same_seed_same_output_whatever_the_batch_size(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    kwargs = {"n": 2, "max_new_tokens": 6, "seed": 0}
    in_threes = sample_pairs(model, tokenizer, PROMPTS, batch_size=3, **kwargs)
    one_by_one = sample_pairs(model, tokenizer, PROMPTS, batch_size=1, **kwargs)
    assert in_threes == one_by_one
    assert sample_pairs(model, tokenizer, PROMPTS, batch_size=3, **kwargs) == in_threes
    other_seed = sample_pairs(model, tokenizer, PROMPTS, batch_size=3, n=2, max_new_tokens=6, seed=1)
    assert [r["responses"] for r in other_seed] != [r["responses"] for r in in_threes]
    # The two responses of a pair come from different streams.
    assert any(r["responses"][0] != r["responses"][1] for r in in_threes)


def test_resume_after_a_prefix_equals_an_uninterrupted_run(model_dir, tmp_path):
    full = write_txt(tmp_path / "all.txt", PROMPTS)
    run(model_dir, full, tmp_path / "straight.jsonl")
    resumed = tmp_path / "resumed.jsonl"
    assert run(model_dir, write_txt(tmp_path / "head.txt", PROMPTS[:4]), resumed) == (0, 4)
    assert run(model_dir, full, resumed) == (4, len(PROMPTS) - 4)
    assert resumed.read_text() == (tmp_path / "straight.jsonl").read_text()


def test_resume_after_a_kill_mid_write_equals_an_uninterrupted_run(model_dir, tmp_path):
    prompts = write_txt(tmp_path / "all.txt", PROMPTS)
    run(model_dir, prompts, tmp_path / "straight.jsonl")
    expected = (tmp_path / "straight.jsonl").read_text()

    class Killed(Exception):
        pass

    def kill(_):
        raise Killed

    out = tmp_path / "killed.jsonl"
    with pytest.raises(Killed):
        run(model_dir, prompts, out, on_batch=kill)
    assert len(read_records(out)) == 3  # the first batch reached the disk before the kill
    with open(out, "a") as f:
        f.write('{"pair_id": "p000003", "prompt": "A pref')  # a torn line, no newline
    assert run(model_dir, prompts, out) == (3, len(PROMPTS) - 3)
    assert out.read_text() == expected

    # Cutting the last complete line in half also resumes cleanly.
    out.write_text(expected[: expected.rstrip("\n").rfind("\n") + 20])
    assert run(model_dir, prompts, out) == (len(PROMPTS) - 1, 1)
    assert out.read_text() == expected
    assert run(model_dir, prompts, out) == (len(PROMPTS), 0)  # finished: nothing appended
    assert out.read_text() == expected


def test_prompts_too_long_for_the_model_are_all_named_before_any_is_sampled(model_dir, tmp_path):
    """They were found batch by batch: a run stopped at the first one's batch, after sampling
    the batches before it, and named that prompt alone; the next one stopped the rerun."""
    too_long = "word " * 200  # past the tiny model's 512 positions
    prompts = write_txt(tmp_path / "p.txt", [*PROMPTS[:4], too_long, PROMPTS[4], too_long])
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(UserError, match=r"^2 prompts \(counting from 0, as pair ids do: 4, 6\) with "
                       r"--max-new-tokens 6 need more than the 512 positions of .*; shorten or drop those "
                       r"prompts, or lower --max-new-tokens\.$"):
        run(model_dir, prompts, out)
    assert not out.exists()


def test_resume_refuses_a_file_from_another_job(model_dir, tmp_path):
    prompts = write_txt(tmp_path / "all.txt", PROMPTS)
    out = tmp_path / "pairs.jsonl"
    run(model_dir, write_txt(tmp_path / "head.txt", PROMPTS[:2]), out)
    hotter = SamplingSettings(temperature=1.5, max_new_tokens=6)
    with pytest.raises(UserError, match="line 1"):
        run(model_dir, prompts, out, settings=hotter)
    with pytest.raises(UserError, match="another job"):
        run(model_dir, write_txt(tmp_path / "other.txt", ["x", "y", "z"]), out)


def test_a_folder_as_prompts_is_named_as_such(tmp_path):
    """It said "prompt file not found" for a folder that is there."""
    with pytest.raises(UserError, match="a folder, not a prompt file"):
        load_prompts(tmp_path)


def test_a_prompt_file_without_read_permission_is_one_sentence(tmp_path, monkeypatch):
    """`preftune sample --prompts` on a file of another account printed a PermissionError traceback."""
    from preftune_test_data import deny_reading

    prompts = write_txt(tmp_path / "prompts.txt", PROMPTS)
    deny_reading(monkeypatch, prompts)
    with pytest.raises(UserError, match=f"{prompts} cannot be read: no permission to read it"):
        load_prompts(prompts)


def test_a_folder_as_out_is_one_sentence(model_dir, tmp_path):
    """--out naming a folder was an IsADirectoryError traceback."""
    with pytest.raises(UserError, match="is a folder; name the file"):
        run(model_dir, write_txt(tmp_path / "p.txt", PROMPTS[:1]), tmp_path)


def test_an_out_whose_folder_is_a_file_is_one_sentence(model_dir, tmp_path):
    """Making --out's folder through a file was a FileExistsError traceback."""
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="a_file cannot be a folder, a file holds its place"):
        run(model_dir, write_txt(tmp_path / "p.txt", PROMPTS[:1]), tmp_path / "a_file" / "pairs.jsonl")


def test_out_naming_the_prompt_file_is_refused_and_the_file_kept(model_dir, tmp_path):
    """Resuming into the prompt file itself cut its last line when it had no newline."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}')
    with pytest.raises(UserError, match="is the --prompts file itself"):
        run(model_dir, prompts, prompts)
    assert prompts.read_text() == '{"prompt": "a"}\n{"prompt": "b"}'


def test_a_chat_prompt_without_a_chat_template_names_the_prompt(model_and_tokenizer):
    """The sentence said "a prompt", leaving the user to search the file for it."""
    _, tokenizer = model_and_tokenizer
    bare = copy.copy(tokenizer)
    bare.chat_template = None
    chat = [{"role": "user", "content": "Hello"}]
    with pytest.raises(UserError, match=r"^prompt 4 \(counting from 0, as its pair id does\) is a list"):
        encode_prompts(bare, ["text", chat], indices=[3, 4])


def test_chat_prompts_are_rendered_with_the_template(model_and_tokenizer, model_dir, tmp_path):
    model, tokenizer = model_and_tokenizer
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    rendered = "<|system|>\nBe brief.<|eos|>\n<|user|>\nHello<|eos|>\n<|assistant|>\n"
    input_ids, _ = encode_prompts(tokenizer, [chat])
    assert input_ids[0].tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    via_chat = sample_pairs(model, tokenizer, [chat], max_new_tokens=6)
    via_text = sample_pairs(model, tokenizer, [rendered], max_new_tokens=6)
    assert via_chat[0]["responses"] == via_text[0]["responses"]
    assert via_chat[0]["prompt"] == chat  # the record keeps the messages, not the rendering

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": chat}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")
    run(model_dir, jsonl, tmp_path / "pairs.jsonl")
    assert [r["prompt"] for r in read_records(tmp_path / "pairs.jsonl")] == [chat, "Hi"]


def test_prompts_are_left_padded(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    short = tokenizer("Hi")["input_ids"]
    long = tokenizer("What is the best ice cream?")["input_ids"]
    input_ids, attention_mask = encode_prompts(tokenizer, ["Hi", "What is the best ice cream?"])
    pad = len(long) - len(short)
    assert input_ids.shape == (2, len(long))
    assert input_ids[0].tolist() == [tokenizer.pad_token_id] * pad + short
    assert attention_mask[0].tolist() == [0] * pad + [1] * len(short)
    assert attention_mask[1].tolist() == [1] * len(long)


def test_greedy_responses_are_the_new_tokens_cut_at_eos(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = "The quick brown fox"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    generated = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
        pad_token_id=tokenizer.pad_token_id,
    )[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in generated:
        generated = generated[: generated.index(tokenizer.eos_token_id)]
    expected = tokenizer.decode(generated, skip_special_tokens=True)
    config_before = model.generation_config.to_dict()
    record = sample_pairs(model, tokenizer, [prompt], temperature=0.0, max_new_tokens=6, n=1)[0]
    assert record["responses"] == [expected]
    assert model.generation_config.to_dict() == config_before  # sampling leaves it alone
    # A vanishing nucleus keeps only the top token: sampling becomes greedy too; so do top-k 1
    # and a min-p that only the top token reaches.
    for only_the_top in ({"top_p": 1e-6}, {"top_k": 1}, {"min_p": 0.999999}):
        record = sample_pairs(model, tokenizer, [prompt], max_new_tokens=6, **only_the_top)[0]
        assert record["responses"] == [expected, expected], only_the_top


def test_decoding_stops_at_eos(model_and_tokenizer):
    from preftune.sampling import _decode_until_stop

    _, tokenizer = model_and_tokenizer
    words = tokenizer("fox jumps")["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    later = tokenizer(" lazy dog")["input_ids"]
    assert _decode_until_stop(tokenizer, words + [eos] + later + [pad], [eos]) == "fox jumps"


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    # Sorted: 0.5, 0.3, 0.2; mass before each: 0, 0.5, 0.8.
    assert torch.allclose(nucleus_probs(logits, 0.6), torch.tensor([[0.0, 0.5, 0.3]]))
    assert torch.allclose(nucleus_probs(logits, 0.5), torch.tensor([[0.0, 0.5, 0.0]]))
    assert torch.allclose(nucleus_probs(logits, 1.0), torch.tensor([[0.2, 0.5, 0.3]]))


def test_top_k_then_top_p_on_what_it_kept_then_min_p():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    top_two = torch.tensor([[0.0, 0.0, 3 / 7, 4 / 7]])  # what is kept, renormalised
    top_one = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    assert torch.allclose(filtered_probs(logits), torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    assert torch.allclose(filtered_probs(logits, top_k=2), top_two)
    # After top-k 2 the kept tokens weigh 3/7 and 4/7: a nucleus of 0.5 holds the 4/7 alone,
    # where over the full distribution it needs 0.4 + 0.3.
    assert torch.allclose(filtered_probs(logits, top_k=2, top_p=0.5), top_one)
    assert torch.allclose(filtered_probs(logits, top_p=0.5), top_two)
    # min-p 0.6: tokens below 0.6 x 0.4 = 0.24 go; 0.8: below 0.32.
    assert torch.allclose(filtered_probs(logits, min_p=0.6), top_two)
    assert torch.allclose(filtered_probs(logits, min_p=0.8), top_one)
    # Tokens tied with the k-th stay, as in transformers; k at or past the vocabulary is no filter.
    tied = torch.log(torch.tensor([[0.3, 0.3, 0.4]]))
    assert torch.allclose(filtered_probs(tied, top_k=2), torch.tensor([[0.3, 0.3, 0.4]]))
    assert torch.allclose(filtered_probs(logits, top_k=4), filtered_probs(logits))


def test_a_file_written_before_top_k_and_min_p_existed_resumes(model_dir, tmp_path):
    # Such a file's `sampling` has neither key; written now with both off, it has neither
    # either, so the same job resumes it; with top-k on it is another job.
    prompts = write_txt(tmp_path / "all.txt", PROMPTS)
    out = tmp_path / "pairs.jsonl"
    run(model_dir, write_txt(tmp_path / "head.txt", PROMPTS[:3]), out)
    assert all(set(r["sampling"]) == {"temperature", "top_p", "max_new_tokens", "seed", "n"}
               for r in read_records(out))
    with pytest.raises(UserError, match="another job"):
        run(model_dir, prompts, out, settings=SamplingSettings(max_new_tokens=6, top_k=5))
    assert run(model_dir, prompts, out) == (3, len(PROMPTS) - 3)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": "unclosed\n', "line 2: not valid JSON"),
        ("bad.jsonl", '{"prompt": "ok"}\n\n{"text": "x"}\n', 'line 3: expected an object with a "prompt"'),
        # chat data as TRL's "messages" rows, or a bare list of messages: say where they go
        ("bad.jsonl", '{"messages": [{"role": "user", "content": "Hi"}]}\n',
         'line 1: expected an object with a "prompt" key: put the messages to answer'),
        ("bad.jsonl", '[{"role": "user", "content": "Hi"}]\n', 'line 1: expected .* key: put the messages to answer'),
        ("bad.jsonl", '{"prompt": 7}\n', "line 1: \"prompt\" must be"),
        ("bad.jsonl", '{"prompt": [{"role": "user"}]}\n', "line 1: \"prompt\" must be"),
        ("bad.jsonl", '{"prompt": "   "}\n', "line 1: \"prompt\" is empty"),
        # a broken \u escape: the tokenizer raised a TypeError from deep inside sampling
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": "a \\ud800"}\n', "line 2: field 'prompt' holds an invalid character"),
        ("bad.jsonl", '{"prompt": [{"role": "user", "content": "\\udc00"}]}\n',
         r"line 1: field 'prompt\[0\].content' holds an invalid character"),
        ("empty.txt", "\n  \n", "holds no prompts"),
        ("prompts.csv", "a,b\n", "unknown prompt file type"),
    ],
)
def test_bad_prompt_files_name_the_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError, match=message) as info:
        load_prompts(path)
    assert str(path) in str(info.value)


def test_a_prompt_file_not_in_utf8_names_the_line(tmp_path):
    """It named a byte offset alone, which a large prompt file gives no way to find by eye."""
    path = tmp_path / "p.txt"
    path.write_bytes(b"first\nsecond\ncaf\xe9 au lait\n")
    with pytest.raises(UserError, match=r"p.txt, line 3: not UTF-8 text \(invalid continuation byte at byte 16\)"):
        load_prompts(path)
    # After a byte-order mark the decoder counts from the byte after it: the line and byte
    # must still be the file's own (it said line 2, byte 13 here).
    path.write_bytes(b"\xef\xbb\xbffirst\nsecond\n\xe9t\xe9\n")
    with pytest.raises(UserError, match=r"p.txt, line 3: not UTF-8 text \(invalid continuation byte at byte 16\)"):
        load_prompts(path)


def test_text_prompts_skip_blank_lines_and_keep_inner_spaces(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("The movie\n\n  was  \r\nlast\n")
    with pytest.warns(UserWarning, match="skipped 1 blank line;") as caught:
        assert load_prompts(path) == ["The movie", "  was  ", "last"]
    assert str(path) in str(caught[0].message)


def test_a_prompt_holding_a_line_separator_or_a_file_starting_with_a_bom_reads_as_written(tmp_path):
    """str.splitlines() broke a line at U+2028 and U+0085 too: a JSONL prompt holding one raw (as
    json.dumps(ensure_ascii=False) writes it) was 'not valid JSON', a .txt prompt became two; and a
    .txt file's byte-order mark began the first prompt."""
    (tmp_path / "p.jsonl").write_text('{"prompt": "one\u2028line"}\n{"prompt": "two\x85"}\n', encoding="utf-8")
    assert load_prompts(tmp_path / "p.jsonl") == ["one\u2028line", "two\x85"]
    (tmp_path / "p.txt").write_bytes("\ufefffirst\r\nsecond\u2028half\x0cpage\n".encode())
    assert load_prompts(tmp_path / "p.txt") == ["first", "second\u2028half\x0cpage"]


def test_a_json_prompt_file_may_hold_one_list_of_prompt_objects(tmp_path):
    """Read line by line, a pretty-printed list was refused at its "[" as 'line 1: not valid JSON'."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}]}], indent=2))
    assert load_prompts(path) == ["a", [{"role": "user", "content": "b"}]]
    path.write_text('[{"prompt": "a"}, {"text": "b"}]')
    with pytest.raises(UserError, match=r"p.json, row 1: expected an object with a \"prompt\" key"):
        load_prompts(path)


def test_blank_lines_are_counted_not_dropped_silently(tmp_path):
    """Pair ids number the prompts (files sampled earlier must resume), so the warning says so."""
    path = tmp_path / "p.jsonl"
    path.write_text('\n{"prompt": "a"}\n \n\n{"prompt": "b"}\n')
    with pytest.warns(UserWarning, match="skipped 3 blank lines; pair ids number the 2 prompts"):
        assert load_prompts(path) == ["a", "b"]


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="--top-p"):
        SamplingSettings(top_p=0.0)
    with pytest.raises(UserError, match="--n"):
        SamplingSettings(n=0)
    with pytest.raises(UserError, match=r"--top-k must be 0 \(off\) or positive, got -1"):
        SamplingSettings(top_k=-1)
    with pytest.raises(UserError, match=r"--min-p must be in \[0, 1\) \(0 is off\), got 1.0"):
        SamplingSettings(min_p=1.0)
    # Greedy decoding cannot give two different responses: pairs would have chosen == rejected.
    with pytest.raises(UserError, match=r"--temperature 0 .* same response 2 times.*--n 1"):
        SamplingSettings(temperature=0.0, n=2)
    assert SamplingSettings(temperature=0.0, n=1).n == 1


@pytest.mark.parametrize("broken", ["no files", "unknown architecture", "pad token past the embeddings"])
def test_a_folder_without_a_loadable_model_is_one_sentence(model_dir, tmp_path, broken):
    import shutil

    folder = tmp_path / "model"
    folder.mkdir()
    if broken == "unknown architecture":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(model_dir / name, folder / name)
        (folder / "config.json").write_text('{"model_type": "no_such_architecture"}')
    message = r"model: cannot load a model and tokenizer from it \(\S"
    if broken == "pad token past the embeddings":
        from transformers import AutoTokenizer

        shutil.copytree(model_dir, folder, dirs_exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        tokenizer.save_pretrained(folder)
        message = r"model'? has pad token '\[PAD\]' with id \d+, outside the model's"
    with pytest.raises(UserError, match=message):
        load_model_and_tokenizer(str(folder), device="cpu")


def test_cli_samples_and_resumes(model_dir, tmp_path):
    prompts = write_txt(tmp_path / "p.txt", PROMPTS[:3])
    out = tmp_path / "pairs.jsonl"
    args = ["--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
            "--max-new-tokens", "4", "--n", "3", "--seed", "5", "--top-k", "40", "--min-p", "0.05",
            "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = read_records(out)
    assert len(records) == 3 and all(len(r["responses"]) == 3 for r in records)
    assert "3 responses per prompt: `preftune label auto` keeps the best and the worst" in " ".join(result.output.split())
    assert records[0]["sampling"] == {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4, "seed": 5,
                                      "n": 3, "top_k": 40, "min_p": 0.05}
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "nothing to do" in again.output
    single = CliRunner().invoke(app, [*args[:5], str(tmp_path / "single.jsonl"), *args[6:], "--n", "1"])
    assert single.exit_code == 0 and "nothing to compare" in single.output
    assert "wrote 3 prompts x 1 response to" in single.output  # not "1 responses"
    missing = CliRunner().invoke(app, args[:2] + ["--prompts", str(tmp_path / "no.txt")] + args[4:])
    assert isinstance(missing.exception, UserError)


def test_cli_stopped_by_ctrl_c_says_what_is_kept_and_to_rerun(model_dir, tmp_path, monkeypatch):
    """Ctrl-C ended `preftune sample` without a word: nothing said the batches written were kept
    or that a rerun continues after them."""
    import preftune.sampling

    def ctrl_c_after_the_first_batch(*args, **kwargs):
        def interrupt(_):
            raise KeyboardInterrupt
        return sample_to_file(*args, **kwargs, on_batch=interrupt)

    # `preftune sample` imports sample_to_file when it runs (no torch at start-up), so patch its home.
    monkeypatch.setattr(preftune.sampling, "sample_to_file", ctrl_c_after_the_first_batch)
    out = tmp_path / "pairs.jsonl"
    args = ["--model", str(model_dir), "--prompts", str(write_txt(tmp_path / "p.txt", PROMPTS)),
            "--out", str(out), "--max-new-tokens", "2", "--batch-size", "3", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130
    assert (f"stopped by Ctrl-C: {out} keeps 3 prompts sampled so far; rerun the same command to "
            "continue.") in " ".join(result.output.split())
    assert len(read_records(out)) == 3


def test_cli_out_of_memory_says_what_is_kept_and_to_lower_the_batch_size(model_dir, tmp_path, monkeypatch):
    """Running out of GPU memory mid-run was a traceback, which said neither that the batches
    written were kept nor that a smaller --batch-size resumes."""
    import preftune.sampling

    def out_of_memory_after_the_first_batch(*args, **kwargs):
        def out_of_memory(_):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return sample_to_file(*args, **kwargs, on_batch=out_of_memory)

    # `preftune sample` imports sample_to_file when it runs (no torch at start-up), so patch its home.
    monkeypatch.setattr(preftune.sampling, "sample_to_file", out_of_memory_after_the_first_batch)
    out = tmp_path / "pairs.jsonl"
    args = ["--model", str(model_dir), "--prompts", str(write_txt(tmp_path / "p.txt", PROMPTS)),
            "--out", str(out), "--max-new-tokens", "2", "--batch-size", "3", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, UserError)
    assert str(result.exception) == (f"out of memory sampling 3 prompts x 2 responses at once; {out} keeps 3 "
                                     "prompts sampled so far: rerun with a smaller --batch-size (say 1) to "
                                     "continue or with --dtype bfloat16.")
    assert len(read_records(out)) == 3


def test_cli_out_of_memory_loading_the_model_does_not_blame_the_batch_size(model_dir, tmp_path, monkeypatch):
    """A model too large for the GPU ran out of memory as it loaded, and the sentence for a batch
    too large said to rerun with a smaller --batch-size, which cannot help."""
    import preftune.sampling

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(preftune.sampling, "load_model_and_tokenizer", out_of_memory)
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(app, ["--model", str(model_dir), "--prompts", str(write_txt(tmp_path / "p.txt", PROMPTS)),
                                      "--out", str(out), "--no-progress"])
    assert isinstance(result.exception, UserError)
    assert str(result.exception) == (f"{model_dir}: out of GPU memory loading the model in float32, before sampling "
                                     "anything; pass --dtype bfloat16 (half the memory) or use a GPU with more memory.")


def test_cli_counts_one_prompt_in_the_singular(model_dir, tmp_path):
    """It said "already holds all 1 prompts" and "resumed after 1 prompts"."""
    out = tmp_path / "pairs.jsonl"
    args = ["--model", str(model_dir), "--prompts", str(tmp_path / "p.txt"), "--out", str(out),
            "--max-new-tokens", "2", "--no-progress"]

    def said() -> str:  # as one line: rich wraps at the terminal width
        return " ".join(CliRunner().invoke(app, args).output.split())

    write_txt(tmp_path / "p.txt", PROMPTS[:1])
    assert "wrote 1 prompt x 2 responses" in said()
    assert "already holds the 1 prompt; nothing to do." in said()
    write_txt(tmp_path / "p.txt", PROMPTS[:2])  # one more prompt: the run resumes after the first
    assert "resumed after 1 prompt; wrote 1 more" in said()
    assert "already holds all 2 prompts; nothing to do." in said()


def test_a_model_path_that_names_no_folder_is_named_as_such(tmp_path, monkeypatch):
    """'./missing' went to transformers as a hub id, which answered with its repo-id naming rules
    ("Repo id must use alphanumeric chars") instead of saying the folder is not there."""
    monkeypatch.chdir(tmp_path)
    prompts = write_txt(tmp_path / "p.txt", PROMPTS[:1])
    for path in ("./missing", str(tmp_path / "missing"), "~/no-such-preftune-model"):
        result = CliRunner().invoke(app, ["--model", path, "--prompts", str(prompts),
                                          "--out", str(tmp_path / "pairs.jsonl"), "--no-progress"])
        assert isinstance(result.exception, UserError)
        assert str(result.exception) == f"model folder {path} does not exist; check --model."


def test_id_prefix_keeps_two_batches_apart_in_one_labeling_database(model_dir, tmp_path):
    from preftune.labeling.pairs import load_pairs as load_labeling_pairs
    from preftune.labeling.store import Store

    args = ["--model", str(model_dir), "--max-new-tokens", "4", "--no-progress"]
    for name, prompts, prefix in (("a", PROMPTS[:2], "p"), ("b", PROMPTS[2:4], "b2-")):
        path = write_txt(tmp_path / f"{name}.txt", prompts)
        result = CliRunner().invoke(app, [*args, "--prompts", str(path), "--out", str(tmp_path / f"{name}.jsonl"),
                                          "--id-prefix", prefix])
        assert result.exit_code == 0, result.output
    assert [r["pair_id"] for r in read_records(tmp_path / "b.jsonl")] == ["b2-000000", "b2-000001"]
    store = Store(tmp_path / "labels.db")
    for name in ("a", "b"):
        store.add_pairs(load_labeling_pairs(tmp_path / f"{name}.jsonl"))
    assert sorted(store.pairs()) == ["b2-000000", "b2-000001", "p000000", "p000001"]
    store.close()
    # Resuming with another prefix would mix two id schemes in one file.
    again = CliRunner().invoke(app, [*args, "--prompts", str(tmp_path / "b.txt"), "--out", str(tmp_path / "b.jsonl")])
    assert isinstance(again.exception, UserError) and "--id-prefix" in str(again.exception)
    bad = CliRunner().invoke(app, [*args, "--prompts", str(tmp_path / "b.txt"), "--out", str(tmp_path / "c.jsonl"),
                                   "--id-prefix", "a b"])
    assert isinstance(bad.exception, UserError) and "--id-prefix 'a b'" in str(bad.exception)


def test_token_ids_are_the_ones_behind_the_text(model_and_tokenizer):
    from preftune.sampling import generate_token_ids

    model, tokenizer = model_and_tokenizer
    prompts = ["Hi", "The quick brown fox"]
    prompt_ids, rows = generate_token_ids(model, tokenizer, prompts, [0, 1], SETTINGS)
    assert prompt_ids == [tokenizer(p)["input_ids"] for p in prompts]
    records = sample_pairs(model, tokenizer, prompts, max_new_tokens=6)
    eos = tokenizer.eos_token_id
    for record, row in zip(records, rows):
        assert len(row) == 2
        for text, ids in zip(record["responses"], row):
            assert eos not in ids[:-1] and len(ids) <= 6
            kept = ids[:-1] if ids and ids[-1] == eos else ids
            assert tokenizer.decode(kept, skip_special_tokens=True) == text


def test_cli_refuses_greedy_pairs_before_loading_anything(model_dir, tmp_path):
    prompts = write_txt(tmp_path / "p.txt", PROMPTS[:2])
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(app, ["--model", str(model_dir), "--prompts", str(prompts),
                                      "--out", str(out), "--temperature", "0", "--no-progress"])
    assert isinstance(result.exception, UserError)
    assert "set --temperature above 0" in str(result.exception)
    assert not out.exists()


@pytest.fixture
def transformers_bars_on():
    """transformers' bar switch is process-wide and other tests turn it off: start from on."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield
    if not before:
        hf_logging.disable_progress_bar()


@pytest.mark.usefixtures("transformers_bars_on")
def test_no_progress_means_no_transformers_bars_either(model_dir, tmp_path):
    from transformers.utils import logging as hf_logging

    prompts = write_txt(tmp_path / "p.txt", PROMPTS[:2])
    args = ["--model", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "2"]
    quiet = CliRunner().invoke(app, args + ["--out", str(tmp_path / "quiet.jsonl"), "--no-progress"])
    assert quiet.exit_code == 0, quiet.output
    assert "Loading weights" not in quiet.output and "%" not in quiet.output
    assert hf_logging.is_progress_bar_enabled(), "the global switch is put back"
    # The check above means something: with progress on, transformers' bar does show.
    loud = CliRunner().invoke(app, args + ["--out", str(tmp_path / "loud.jsonl")])
    assert loud.exit_code == 0 and "Loading weights" in loud.output


@pytest.mark.usefixtures("transformers_bars_on")
def test_cli_refuses_batch_size_zero_before_loading_or_drawing_a_bar(model_dir, tmp_path):
    """--batch-size 0 was refused only when the first batch was drawn: after the weight-loading
    bar and a 0% sampling bar."""
    prompts = write_txt(tmp_path / "p.txt", PROMPTS[:2])
    result = CliRunner().invoke(app, ["--model", str(model_dir), "--prompts", str(prompts),
                                      "--out", str(tmp_path / "pairs.jsonl"), "--batch-size", "0"])
    assert isinstance(result.exception, UserError)
    assert str(result.exception) == "--batch-size must be at least 1, got 0."
    assert "Loading weights" not in result.output and "sampling" not in result.output


def test_resume_knows_the_model_folder_however_it_is_named(tmp_path, monkeypatch):
    # Records name a local model by its absolute path; files from before hold it as typed.
    from preftune.sampling import resume_position

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    settings = SamplingSettings()
    for written in (str(tmp_path / "m"), "m"):
        records = [{"pair_id": "p000000", "prompt": "Hi", "sampling": settings.to_dict(), "model": written}]
        assert resume_position(tmp_path / "out.jsonl", records, ["Hi", "Yo"], settings, "m") == 1
    records[0]["model"] = "another-model"
    with pytest.raises(UserError, match="written by another job"):
        resume_position(tmp_path / "out.jsonl", records, ["Hi", "Yo"], settings, "m")
