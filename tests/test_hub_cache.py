"""Hub ids read from a Hugging Face cache filled earlier, offline (HF_HUB_OFFLINE=1, conftest),
as on a cluster without network: the cache is laid out here as the Hub's download leaves it."""

from __future__ import annotations

import os

import pytest
from preftune_test_data import PAIRS, hub_revision, write_jsonl

from preftune.errors import UserError


@pytest.fixture
def hub_model(tmp_path, tiny_llama, monkeypatch):
    """'org/tiny' in a hub cache of its own (models--org--tiny/snapshots/<commit>, refs/main)."""
    import huggingface_hub

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    hub_revision(cache, "org/tiny", tiny_llama, "c" * 40)
    return "org/tiny"


def test_eval_pairs_of_a_hub_model_asks_for_out_rather_than_make_a_folder_named_like_it(
        hub_model, tmp_path, monkeypatch):
    """eval.json went to ./org/tiny/, a folder that from then on was loaded in place of the
    cached model (a tokenizer error, naming nothing about eval.json)."""
    from preftune.evaluate import evaluate_pairs_file

    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(UserError) as caught:
        evaluate_pairs_file(hub_model, data, hub_model, device="cpu")
    assert str(caught.value) == ("--model org/tiny is a hub id, not a folder here, so eval.json has no "
                                 "model folder to go in; pass --out FOLDER.")
    assert not (tmp_path / "org").exists()
    record = evaluate_pairs_file(hub_model, data, hub_model, out=tmp_path / "scores", device="cpu")
    assert record["model"] == "org/tiny" and (tmp_path / "scores" / "eval.json").is_file()
    assert record["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # the policy is its reference


def test_eval_generate_of_a_hub_model_asks_for_out(hub_model, tmp_path, monkeypatch):
    from preftune.eval_generate import evaluate_generations

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^--model org/tiny is a hub id, not a folder here.*pass --out FOLDER\.$"):
        evaluate_generations(hub_model, hub_model, ["hello"], "reward:operator:concat", device="cpu")
    assert not (tmp_path / "org").exists()


def test_a_cached_hub_model_loads_and_a_missing_one_is_one_sentence_naming_its_option(hub_model, tmp_path):
    """Offline, a hub id the cache lacks ended in transformers' "We couldn't connect to
    'https://huggingface.co'": no network was tried, and the option and the fix went unnamed."""
    import huggingface_hub

    from preftune.modeling import load_causal_lm, load_tokenizer
    from preftune.sampling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(hub_model, "float32", "cpu", setting="--reference")
    assert model.config.vocab_size == len(tokenizer)
    cache = huggingface_hub.constants.HF_HUB_CACHE
    for load, setting in ((load_tokenizer, "model.path"), (load_causal_lm, "model.reference_path"),
                          (lambda path, setting: load_model_and_tokenizer(path, "float32", "cpu", setting=setting),
                           "--reference")):
        with pytest.raises(UserError) as caught:
            load("org/missing", setting=setting)
        assert str(caught.value) == (
            f"{setting} 'org/missing' is not a folder under {os.getcwd()} and not in the Hugging Face cache "
            f"{cache}, and HF_HUB_OFFLINE=1 keeps it from the Hub; download it into that cache first "
            f"(hf download org/missing) where there is network, or set {setting} to a local model folder.")


def test_export_merge_names_base_when_the_base_is_missing_offline(hub_model, tmp_path):
    from preftune.lora import merge_adapter

    with pytest.raises(UserError, match=r"^--base 'org/missing' is not a folder .* or set --base to a local"):
        merge_adapter(tmp_path, "org/missing", "float32", tmp_path / "merged", setting="--base")


def test_a_hub_data_set_in_the_datasets_cache_is_read_offline(tmp_path, monkeypatch):
    """As `load_dataset` leaves it: DATASETS_CACHE/org___prefs/default/0.0.0/<hash>/prefs-train.arrow."""
    import shutil

    import datasets

    from preftune.data.io import load_pairs

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    datasets.load_dataset("json", data_files={"train": str(data)}, cache_dir=str(tmp_path / "built"))
    built = next(p for p in (tmp_path / "built").glob("json/*/*/*") if p.is_dir())
    cached = tmp_path / "datasets" / "org___prefs" / "default" / "0.0.0" / "abc"
    cached.mkdir(parents=True)
    shutil.copy(built / "json-train.arrow", cached / "prefs-train.arrow")
    shutil.copy(built / "dataset_info.json", cached / "dataset_info.json")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    loaded = load_pairs("org/prefs", setting="data.train")
    assert [p.chosen for p in loaded.pairs] == [r["chosen"] for r in PAIRS]


def test_a_hub_data_set_of_several_configs_in_the_datasets_cache_is_read_by_data_config(tmp_path, monkeypatch):
    """As `load_dataset('org/prefs', 'en')` and `(..., 'de')` leave it: one folder per config.
    Without a config it said 'could not load the hub data set ... There are multiple 'org/prefs'
    configurations in the cache: en, de; check the id and the network', and no key chose one."""
    import json
    import shutil

    import datasets

    from preftune.data.io import load_pairs

    for config, rows in (("en", PAIRS[:2]), ("de", PAIRS[2:])):
        data = write_jsonl(tmp_path / f"{config}.jsonl", rows)
        built_in = tmp_path / "built" / config
        datasets.load_dataset("json", data_files={"train": str(data)}, cache_dir=str(built_in))
        built = next(p for p in built_in.glob("json/*/*/*") if p.is_dir())
        cached = tmp_path / "datasets" / "org___prefs" / config / "0.0.0" / "abc"
        cached.mkdir(parents=True)
        shutil.copy(built / "json-train.arrow", cached / "prefs-train.arrow")
        info = json.loads((built / "dataset_info.json").read_text())
        (cached / "dataset_info.json").write_text(json.dumps(dict(info, config_name=config)))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    assert [p.chosen for p in load_pairs("org/prefs", config="de").pairs] == [r["chosen"] for r in PAIRS[2:]]
    with pytest.raises(UserError) as caught:
        load_pairs("org/prefs", setting="data.train")
    assert str(caught.value) == ("the hub data set 'org/prefs' has several configs (subsets), 'de', 'en', and none "
                                 "is its default; choose one with data.config.")
    with pytest.raises(UserError) as caught:
        load_pairs("org/prefs", setting="data.eval", config="fr")
    assert str(caught.value) == ("the hub data set 'org/prefs' has no config 'fr', only 'de', 'en'; choose one of "
                                 "them with data.eval_config.")
