"""A model name that is not a local folder: what the user is told, and when."""

from __future__ import annotations

import pytest

from preftune.errors import UserError
from preftune.modeling import load_causal_lm, load_tokenizer


def test_a_name_that_is_no_folder_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # HF_HUB_OFFLINE=1 here (conftest): only the hub cache is read
    with pytest.raises(UserError) as caught:
        load_tokenizer("tiny-model")
    assert str(caught.value).startswith(f"model.path 'tiny-model' is not a folder under {tmp_path} and not in "
                                        "the Hugging Face cache")


@pytest.mark.parametrize("path", ["/no/such/model", "./no-such-model", "~/no-such-model"])
def test_a_path_that_names_no_folder_is_a_typo_not_a_hub_id(path, tmp_path, monkeypatch):
    # Written as a path, it cannot be a hub id: the Hub's repo-id rules would only confuse.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError) as caught:
        load_tokenizer(path)
    assert str(caught.value) == f"model folder {path} does not exist; check model.path."


def test_a_reference_path_that_names_no_folder_names_its_own_key(tiny_llama):
    from types import SimpleNamespace

    from preftune.modeling import make_reference

    model_cfg = SimpleNamespace(path=str(tiny_llama), reference_path="/no/such/reference", dtype="float32",
                                attn_implementation=None, trust_remote_code=False)
    with pytest.raises(UserError) as caught:
        make_reference(load_causal_lm(str(tiny_llama)), model_cfg)
    assert str(caught.value) == "model folder /no/such/reference does not exist; check model.reference_path."


def test_a_hub_lookup_is_announced_once_before_it_starts(tmp_path, monkeypatch, capsys):
    # Offline, huggingface_hub retries for most of a minute: the user must know why at once.
    import transformers

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache

    said_before_loading = []

    def unreachable(*args, **kwargs):
        said_before_loading.append(capsys.readouterr().err.count("looking it up on the Hugging Face Hub"))
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", unreachable)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", unreachable)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        with pytest.raises(UserError, match="couldn't connect"):
            load_tokenizer("someone/no-such-model-7")
    with pytest.raises(UserError, match="could not load a causal LM from 'someone/no-such-model-7'"):
        load_causal_lm("someone/no-such-model-7")
    with pytest.raises(UserError):
        load_causal_lm("someone/no-such-model-8")
    # Said before the first load of each name, and only once per name.
    assert said_before_loading == [1, 0, 0, 1]


def test_make_tiny_model_is_the_same_from_any_folder(tmp_path, monkeypatch):
    # It once trained its tokenizer on ./examples/tiny_prefs.jsonl when that existed.
    from typer.testing import CliRunner

    from preftune.cli import app

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "examples").mkdir(parents=True)
    (elsewhere / "examples" / "tiny_prefs.jsonl").write_text('{"prompt": "zebra quagga okapi"}\n' * 50)
    built = []
    for cwd in (tmp_path, elsewhere):
        monkeypatch.chdir(cwd)
        result = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / f"model-{len(built)}")])
        assert result.exit_code == 0, result.output
        built.append((tmp_path / f"model-{len(built)}" / "tokenizer.json").read_text())
    assert built[0] == built[1]

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("zebra quagga okapi\n" * 50)
    result = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / "own"), "--texts", str(corpus)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "own" / "tokenizer.json").read_text() != built[0]
    result = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / "x"), "--texts", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "--texts" in result.output and "does not exist" in result.output


@pytest.mark.parametrize("folder, args, said", [
    ("model", ["--arch", "mistral"], "error: --arch 'mistral' is not a tiny model family; use llama, qwen2 or gpt2."),
    ("notes.txt", [], "notes.txt is a file; pass a folder to write the model and tokenizer into."),
])
def test_make_tiny_model_refuses_a_bad_family_or_a_file_in_one_sentence(tmp_path, folder, args, said):
    # Both were tracebacks: build_model's ValueError, and mkdir's FileExistsError on the file.
    from typer.testing import CliRunner

    from preftune.cli import app

    (tmp_path / "notes.txt").write_text("a file, not a folder\n")
    result = CliRunner().invoke(app, ["make-tiny-model", str(tmp_path / folder), *args])
    assert result.exit_code == 2, result.output
    assert said in result.output and "Traceback" not in result.output


def test_a_pad_token_added_without_resizing_the_model_is_refused_at_load(tmp_path, tiny_llama):
    # The half-done recipe: tokenizer.add_special_tokens({"pad_token": "[PAD]"}), model not
    # resized. Padding with that id would stop the first forward with an IndexError.
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    assert load_tokenizer(str(folder)).pad_token == "<|pad|>"  # in the vocabulary: fine
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.save_pretrained(folder)
    with pytest.raises(UserError, match=r"has pad token '\[PAD\]' with id (\d+), outside the model's \1-token "
                                        r"vocabulary .*resize_token_embeddings"):
        load_tokenizer(str(folder))


@pytest.mark.parametrize("name, said", [
    ("gpu", "train.device 'gpu' is not a device name; use auto, cpu, cuda or cuda:N."),
    ("cuda:1", "train.device 'cuda:1': only 1 CUDA device(s) are visible"),
])
def test_a_device_that_is_not_here_is_one_sentence(name, said, monkeypatch):
    # Once a traceback from torch at the first tensor moved there.
    import torch

    from preftune.modeling import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError) as caught:
        pick_device(name)
    assert said in str(caught.value)
    assert pick_device("cuda:0") == torch.device("cuda", 0)  # the one that is there is accepted


def test_cuda_on_a_machine_without_it_names_the_option(tiny_llama, tmp_path):
    import torch
    from typer.testing import CliRunner

    from preftune.cli import app

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n')
    result = CliRunner().invoke(app, ["sample", "--model", str(tiny_llama), "--prompts", str(prompts),
                                      "--out", str(tmp_path / "pairs.jsonl"), "--device", "cuda"])
    assert result.exit_code != 0
    assert "--device 'cuda': this torch" in result.output and "sees no CUDA device; use auto or cpu." in result.output
    assert not (tmp_path / "pairs.jsonl").exists()
