"""The model card (README.md) that `preftune train` writes into final/ and `export --merge` into
the merged folder: Hub metadata that holds, settings and numbers taken from the run itself."""

from __future__ import annotations

import json

import pytest
import yaml
from preftune_test_data import PAIRS, make_config, read_metrics, write_jsonl

from preftune.model_card import hub_id, model_card
from preftune.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def metadata(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:text.index("\n---", 4)])


def config(**model) -> dict:
    return {"model": {"path": "Qwen/Qwen2.5-0.5B-Instruct", "dtype": "float32", "reference": "copy", **model},
            "data": {"train": "trl-lib/ultrafeedback_binarized", "max_length": 1024, "truncation": "keep_end"},
            "loss": {"type": ["sigmoid", "sft"], "weights": [1.0, 0.2], "beta": 0.1},
            "optim": {"name": "adamw", "lr": 5e-7, "scheduler": "cosine", "warmup_steps": 0.1,
                      "weight_decay": 0.0, "max_grad_norm": 1.0},
            "train": {"batch_size": 4, "grad_accum": 8, "seed": 3}}


METRICS = [{"step": 1, "loss": 0.6931471824645996, "rewards/accuracies": 0.0, "rewards/margins": 0.0},
           {"step": 50, "loss": 0.412345, "rewards/accuracies": 0.8125, "rewards/margins": 1.23456,
            "rewards/chosen": 0.5, "rewards/rejected": -0.73456},
           {"step": 50, "eval/loss": 0.5, "eval/rewards/accuracies": 0.75, "eval/rewards/margins": 0.9}]


def test_hub_ids_go_into_the_metadata_and_the_numbers_are_the_last_ones():
    text = model_card(config(), METRICS, adapter=False, world_size=2, title="qwen-dpo")
    assert metadata(text) == {
        "library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["preftune", "dpo", "sft"],
        "base_model": "Qwen/Qwen2.5-0.5B-Instruct", "datasets": ["trl-lib/ultrafeedback_binarized"],
    }
    assert "# qwen-dpo" in text
    assert "| loss | sigmoid + sft, weights [1.0, 0.2] |" in text
    assert "| pairs per optimizer step | 64 (4 per micro-batch x 8 accumulated x 2 processes) |" in text
    assert "| learning rate | 5e-07, cosine schedule, warmup 0.1 |" in text
    # The last training step's numbers (not the first), and the last evaluation's, to 4 digits.
    assert "Last training step (50); evaluation at step 50" in text
    assert "| train/loss | 0.4123 |" in text and "| rewards/accuracies | 0.8125 |" in text
    assert "| rewards/margins | 1.235 |" in text and "| eval/rewards/accuracies | 0.75 |" in text
    assert "eval/rewards/chosen" not in text  # not in that evaluation's record
    assert "AutoModelForCausalLM.from_pretrained" in text and "rafailov2023direct" in text


def test_a_local_folder_is_no_base_model_and_an_adapter_is_a_peft_card(tmp_path):
    local = tmp_path / "sft-model"
    local.mkdir()
    assert hub_id(str(local)) is None and hub_id("gpt2") == "gpt2" and hub_id("a/b/c") is None
    text = model_card(config(path=str(local), lora={"r": 8, "alpha": 16, "dropout": 0.0,
                                                    "target_modules": "all-linear"}),
                      [], adapter=True, world_size=None)
    meta = metadata(text)
    assert "base_model" not in meta and meta["library_name"] == "peft" and meta["tags"][-1] == "lora"
    assert "| LoRA | r 8, alpha 16, dropout 0.0, modules all-linear |" in text
    assert "| pairs per optimizer step | 32 per process (4 per micro-batch x 8 accumulated) |" in text
    assert "## Results" not in text  # no metrics, no empty table
    assert "AutoPeftModelForCausalLM" in text


def test_a_moving_reference_is_said():
    text = model_card(config(reference_sync={"every": 512, "alpha": 0.6}), [], adapter=False, world_size=1)
    assert ("| reference | the starting model (copy), moved toward the policy every 512 steps (alpha 0.6, "
            "TR-DPO) |") in text


def test_a_reference_free_run_claims_no_reference_and_another_reference_is_named():
    simpo = config(reference="none")
    simpo["loss"] = {"type": "simpo", "beta": 2.0}
    text = model_card(simpo, [], adapter=False, world_size=1)
    assert "(`simpo` loss) with preftune, with no reference model in its loss." in text
    assert "frozen reference" not in text and "| reference | none |" in text
    # Preferred-FT (the sft loss alone) reads no reference even when one is loaded for rewards/*.
    sft = config()
    sft["loss"] = {"type": "sft"}
    assert "with no reference model in its loss." in model_card(sft, [], adapter=False, world_size=1)
    other = model_card(config(reference_path="Qwen/Qwen2.5-1.5B-Instruct"), [], adapter=False, world_size=1)
    assert "against the frozen reference `Qwen/Qwen2.5-1.5B-Instruct`." in other
    assert "copy of the starting model" not in other


@pytest.mark.parametrize("path, named", [
    ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),  # a Hub id, as given
    ("/home/alice/models/pi_sft", "pi_sft"),
    ("/home/alice/sft-run/final", "sft-run/final"),  # a run's final/ by its run
    ("/home/alice/sft-run/checkpoints/step-000300", "sft-run/checkpoints/step-000300"),
])
def test_a_local_model_is_named_without_the_uploaders_folders(path, named):
    """final/'s card named the model path as typed and an export's card config.yaml's absolute
    path; both now name a Hub id as given and a local folder by its name, as they name data."""
    text = model_card(config(path=path, reference_path=path), [], adapter=False, world_size=1)
    assert f"\n\n`{named}` trained on preference pairs" in text
    assert f"against the frozen reference `{named}`." in text and f"| reference | {named} |" in text
    assert "alice" not in text


def test_a_trained_run_leaves_a_card_in_final(tmp_path, tiny_llama):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [dict(r) for r in PAIRS for _ in range(2)])
    final = train(make_config(tmp_path, tiny_llama, pairs, "my-run", train={"max_steps": 2}))
    text = (final / "README.md").read_text()
    assert metadata(text)["library_name"] == "transformers"
    assert text.splitlines()[text.splitlines().index("---", 1) + 2] == "# my-run"
    last = read_metrics(tmp_path / "my-run")[-1]
    assert last["step"] == 2 and f"| train/loss | {last['loss']:.4g} |" in text
    assert json.loads((final / "config.json").read_text())  # the weights' folder, card beside them


def test_a_model_read_from_the_hub_cache_folder_is_named_by_its_hub_id():
    """model.path given as a snapshot folder of the Hugging Face cache: the card named the model
    by the commit hash that folder is named after, and gave the Hub no base_model."""
    from preftune.model_card import model_card

    snapshot = "/home/alice/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B/snapshots/" + "a1" * 20
    card = model_card({"model": {"path": snapshot}}, [], adapter=True, world_size=1)
    assert "base_model: Qwen/Qwen2.5-0.5B" in card
    assert "`Qwen/Qwen2.5-0.5B` trained on preference pairs" in card and "a1a1" not in card
