"""DPO from a PEFT adapter folder (an SFT done with LoRA): model.path names the adapter, not a
merged copy of it. The policy and the reference are base + adapter; adapters trained on top
remember the whole chain."""

from __future__ import annotations

import json
import math

import pytest
import torch
from preftune_test_data import make_config, read_metrics

from preftune.errors import UserError
from preftune.modeling import load_causal_lm, load_tokenizer

IDS = torch.tensor([[3, 17, 5, 9, 30, 2, 11, 40]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, tiny_llama):
    """A LoRA adapter with random (not zero) B, so base + adapter is another model than the base;
    saved by PEFT alone, without a tokenizer, as PEFT's save_pretrained leaves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    folder = tmp_path_factory.mktemp("sft-adapter")
    get_peft_model(base, config).save_pretrained(folder)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_llama)
    return folder


def _unmerged(base_path, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(adapter)).eval()


def test_an_adapter_loads_merged_for_training_and_whole(sft_adapter, tiny_llama):
    expected = _logits(_unmerged(tiny_llama, sft_adapter))
    merged = load_causal_lm(str(sft_adapter), merge_adapter=True).eval()
    assert torch.allclose(_logits(merged), expected, atol=1e-5)
    assert (_logits(load_causal_lm(str(tiny_llama))) - expected).abs().max() > 0.1  # the adapter matters
    assert all(p.requires_grad for p in merged.parameters())  # every weight trains, as a loaded model's
    assert not any("lora" in name for name, _ in merged.named_parameters())
    separate = load_causal_lm(str(sft_adapter)).eval()  # for sampling and evaluation: kept apart
    assert torch.allclose(_logits(separate), expected, atol=1e-5)


def test_an_adapter_saved_without_a_tokenizer_uses_its_bases(sft_adapter, tiny_llama):
    assert load_tokenizer(str(sft_adapter)).get_vocab() == load_tokenizer(str(tiny_llama)).get_vocab()


def test_dpo_from_an_adapter_starts_at_the_adapters_model(sft_adapter, pairs_file, tmp_path, one_torch_thread):
    from preftune.train import train

    # It once stopped with "optimizer got an empty parameter list": transformers loads an adapter
    # folder for inference, every weight frozen.
    train(make_config(tmp_path, sft_adapter, pairs_file, train={"max_steps": 1}))
    first = read_metrics(tmp_path / "run")[0]
    # Policy and reference are both base + adapter at step 1, so DPO's loss is exactly ln 2.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_lora_on_an_adapter_remembers_the_chain(sft_adapter, tiny_llama, pairs_file, tmp_path, one_torch_thread):
    from peft import PeftModel

    from preftune.train import train

    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    train(make_config(tmp_path, sft_adapter, pairs_file, model={"lora": lora}, optim={"lr": 1e-2}))
    final = tmp_path / "run" / "final"
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(sft_adapter)
    sft = _unmerged(tiny_llama, sft_adapter).merge_and_unload()
    expected = _logits(PeftModel.from_pretrained(sft, str(final)).eval())
    assert torch.allclose(_logits(load_causal_lm(str(final)).eval()), expected, atol=1e-5)
    # `preftune sample` and `eval generate` load it the same way (transformers alone cannot:
    # the base it names is an adapter folder, with no config.json).
    from preftune.sampling import load_model_and_tokenizer

    for_sampling, _ = load_model_and_tokenizer(str(final), device="cpu")
    assert torch.allclose(_logits(for_sampling), expected, atol=1e-5)
    # The chain matters: the DPO adapter on the bare base is another model.
    without_sft = _logits(_unmerged(tiny_llama, final))
    assert (without_sft - expected).abs().max() > 0.1
    # `preftune export --merge` folds the whole chain into one model transformers loads alone
    # (it once saved the SFT adapter's weights alone, and stopped on a PEFT version check).
    from transformers import AutoModelForCausalLM

    from preftune.export_cli import export

    export(tmp_path / "run", merge=True, out=None, base=None)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged").eval()
    assert torch.allclose(_logits(merged), expected, atol=1e-5)


def test_an_adapter_whose_base_is_gone_says_where_the_base_is_named(sft_adapter, tmp_path):
    import shutil

    moved = tmp_path / "adapter"
    shutil.copytree(sft_adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"names '.*gone' as its base model \(adapter_config.json's "
                                        r"base_model_name_or_path\), which failed to load: model folder"):
        load_causal_lm(str(moved), merge_adapter=True)


def test_the_reference_cache_key_follows_the_adapters_base(sft_adapter, tiny_llama, tmp_path, pairs_file):
    import shutil

    from preftune.reference import cache_key

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    adapter = tmp_path / "adapter"
    shutil.copytree(sft_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    run_config = make_config(tmp_path, adapter, pairs_file, model={"reference": "precompute"})
    before = cache_key(run_config, [], "train")
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")  # the base changed, the adapter did not
    assert cache_key(run_config, [], "train") != before


def test_a_lora_target_module_that_matches_nothing_is_refused_beside_good_ones(tiny_llama):
    # PEFT refuses only a list of which no name matches; a typo beside good names would leave
    # the layers it meant untrained without a word.
    from types import SimpleNamespace

    from preftune.lora import apply_lora

    lora = SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_prj"])
    with pytest.raises(UserError) as caught:
        apply_lora(load_causal_lm(str(tiny_llama)), lora)
    assert str(caught.value) == ("model.lora.target_modules: 'v_prj' names no module of the model (the other "
                                 "names matched 2); fix or remove it.")
    lora.target_modules = ["q_proj", "layers.0.self_attn.v_proj"]  # PEFT's suffix match: a full name too
    assert len(apply_lora(load_causal_lm(str(tiny_llama)), lora).targeted_module_names) == 3


def test_an_adapter_whose_base_folder_is_gone_names_its_config_not_model_path(sft_adapter, tmp_path):
    # model.path is the adapter, which exists; the path to fix is the base its config names.
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(sft_adapter, adapter)
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"base_model_name_or_path": "/no/such/base"}))
    said = f"model folder /no/such/base does not exist; check base_model_name_or_path in {config_file}."
    with pytest.raises(UserError) as caught:
        load_tokenizer(str(adapter))  # saved without a tokenizer: its base's
    assert str(caught.value) == said
    with pytest.raises(UserError) as caught:
        load_causal_lm(str(adapter))
    assert str(caught.value).endswith(f"which failed to load: {said}")


def test_resume_after_the_adapters_base_model_was_replaced_is_refused(sft_adapter, tiny_llama, tiny_model_factory,
                                                                      pairs_file, tmp_path, one_torch_thread):
    # The resume checked the adapter's own files only: another model under the base's folder was
    # merged with the adapter again, and the run went on from (and against) a model it never saw.
    import shutil

    from preftune.train import train

    base = shutil.copytree(tiny_llama, tmp_path / "base")
    adapter = shutil.copytree(sft_adapter, tmp_path / "adapter")
    adapter_config = adapter / "adapter_config.json"
    adapter_config.write_text(json.dumps(json.loads(adapter_config.read_text()) | {"base_model_name_or_path": str(base)}))
    train(make_config(tmp_path, adapter, pairs_file, train={"max_steps": 1, "save_every": 1}))
    other = tiny_model_factory("llama", seed=1)  # the same architecture, other weights
    shutil.copy2(other / "model.safetensors", base / "model.safetensors")
    longer = make_config(tmp_path, adapter, pairs_file, train={"max_steps": 2, "save_every": 1})
    with pytest.raises(UserError) as caught:
        train(longer, resume=True)
    assert str(caught.value) == (
        f"checkpoint {tmp_path / 'run' / 'checkpoints' / 'step-000001'} was written for another base model: the "
        f"weight files under {base}, the base model {adapter_config} names, differ from those the run started "
        "from, and the model built on them would change mid-run; put back the base model the run started with, "
        "or start a new run in another train.output_dir.")
    shutil.copy2(tiny_llama / "model.safetensors", base / "model.safetensors")  # put back: it resumes
    train(longer, resume=True)
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2]
