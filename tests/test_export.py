"""`preftune export RUN --merge`: where the merged model goes, what it replaces, and that
`preftune eval` evaluates it with the run's own settings, as it does the adapter in RUN/final."""

from __future__ import annotations

from pathlib import Path

import pytest
from preftune_test_data import PAIRS, make_config, write_jsonl

from preftune.errors import UserError
from preftune.evaluate import EXPORT_RECORD, evaluate_pairs_file, run_config
from preftune.train import train

pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", [dict(r) for r in PAIRS for _ in range(4)])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama, pairs_file):
    folder = tmp_path_factory.mktemp("export")
    # max_length 24 (not the evaluator's default of 1024) truncates some pairs: an evaluation
    # that missed the run's settings would give other numbers.
    train(make_config(folder, tiny_llama, pairs_file, "run", model={"lora": LORA},
                      data={"max_length": 24}, optim={"lr": 1e-2}, train={"max_steps": 2, "save_every": 1}))
    return folder / "run"


def test_merged_model_is_evaluated_with_the_runs_settings(lora_run, pairs_file, tmp_path):
    from preftune.export_cli import export

    export(lora_run, merge=True, out=None, base=None)
    merged = lora_run / "merged"
    assert (merged / EXPORT_RECORD).is_file()
    assert run_config(merged) == run_config(lora_run / "final")
    on_adapter = evaluate_pairs_file(str(lora_run / "final"), str(pairs_file), None, out=tmp_path / "a")
    on_merged = evaluate_pairs_file(str(merged), str(pairs_file), None, out=tmp_path / "m")
    for key in ("eval/loss", "eval/rewards/margins", "eval/lengths/chosen"):
        assert on_merged[key] == pytest.approx(on_adapter[key], abs=1e-5), key


def test_the_adapter_and_the_merged_model_carry_cards_of_their_own_kind(lora_run):
    from preftune.export_cli import export

    export(lora_run, merge=True, out=None, base=None)
    adapter_card = (lora_run / "final" / "README.md").read_text()
    merged_card = (lora_run / "merged" / "README.md").read_text()
    # preftune's card, not the placeholder PEFT's save_pretrained writes beside an adapter.
    assert "Model Card for Model ID" not in adapter_card and "library_name: peft" in adapter_card
    assert "AutoPeftModelForCausalLM" in adapter_card and "- lora" in adapter_card
    assert "library_name: transformers" in merged_card and "- lora" not in merged_card
    assert "# run, merged" in merged_card and "AutoModelForCausalLM" in merged_card
    assert "| LoRA | r 4, alpha 8" in merged_card  # how it was trained, still


def test_the_merged_card_names_the_base_it_was_merged_onto(lora_run, tiny_llama, tmp_path):
    import shutil

    from preftune.export_cli import export

    other = shutil.copytree(tiny_llama, tmp_path / "other-base")
    export(lora_run, merge=True, out=tmp_path / "merged", base=str(other))
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "`other-base` trained on preference pairs" in card and str(tmp_path) not in card
    assert str(tiny_llama) not in card  # the run's model.path is not what these weights hold


def test_both_cards_name_local_data_and_models_the_same_way(tmp_path, tiny_llama, monkeypatch):
    """The training card had the paths as typed, the export's config.yaml's absolute ones: on the
    Hub each card names a local file or model folder by its name, without the uploader's folders."""
    import shutil

    from preftune.export_cli import export

    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "prefs.jsonl", [dict(r) for r in PAIRS for _ in range(2)])
    shutil.copytree(tiny_llama, tmp_path / "models" / "pi_sft")
    monkeypatch.chdir(tmp_path)
    train(make_config(tmp_path, "models/pi_sft", "data/prefs.jsonl", "run", model={"lora": LORA},
                      train={"max_steps": 1}))
    export(tmp_path / "run", merge=True, out=None, base=None)
    for card in ("final", "merged"):
        text = (tmp_path / "run" / card / "README.md").read_text()
        assert "| data | `prefs.jsonl` |" in text.splitlines(), card
        assert "\n\n`pi_sft` trained on preference pairs" in text, card
        assert "models/pi_sft" not in text and str(tmp_path) not in text, card


def test_a_checkpoint_exports_beside_the_run_not_into_checkpoints(lora_run):
    from preftune.export_cli import export

    export(lora_run / "checkpoints" / "step-000001", merge=True, out=None, base=None)
    assert (lora_run / "merged-step-000001" / "config.json").is_file()
    # Its card: the checkpoint's step and numbers, not those of the run's last step (2).
    card = (lora_run / "merged-step-000001" / "README.md").read_text()
    assert "# run, step 1, merged" in card and "Last training step (1)" in card, card
    assert not (lora_run / "checkpoints" / "merged").exists()


def test_an_export_replaces_an_earlier_export_and_nothing_else(lora_run, tmp_path):
    from preftune.export_cli import export

    target = tmp_path / "merged"
    export(lora_run, merge=True, out=target, base=None)
    (target / "eval.json").write_text("{}")  # from an evaluation of the earlier export
    export(lora_run, merge=True, out=target, base=None)
    assert not (target / "eval.json").exists() and (target / "model.safetensors").is_file()

    base_like = tmp_path / "base"
    base_like.mkdir()
    (base_like / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"--out .*base already exists and is not a model preftune exported"):
        export(lora_run, merge=True, out=base_like, base=None)
    assert [p.name for p in base_like.iterdir()] == ["config.json"]


def test_a_full_disk_mid_export_keeps_the_earlier_export_and_says_to_export_again(lora_run, tmp_path, monkeypatch):
    # It said "the earlier checkpoints are intact; ... resume with --resume", which export has not.
    import errno

    from preftune import checkpoint
    from preftune.export_cli import export

    target = tmp_path / "merged"
    export(lora_run, merge=True, out=target, base=None)
    weights = (target / "model.safetensors").read_bytes()

    def full(folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_fsync_tree", full)
    with pytest.raises(UserError, match=r"out of disk space while saving the merged model .*merged; any earlier "
                                        r"export there is intact; free some space and run the export again\.$"):
        export(lora_run, merge=True, out=target, base=None)
    assert (target / "model.safetensors").read_bytes() == weights
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


class Killed(BaseException):
    """SIGKILL, as far as the code under test can tell: nothing after it runs."""


def test_an_export_killed_while_the_earlier_one_is_deleted_leaves_a_whole_model(lora_run, tmp_path, monkeypatch):
    # The earlier export was deleted in place before the new one was renamed in: a kill during
    # the deletion left half a folder, without its export record, which the rerun then refused
    # ("already exists and is not a model preftune exported").
    from preftune import checkpoint
    from preftune.export_cli import export

    target = tmp_path / "merged"
    export(lora_run, merge=True, out=target, base=None)
    (tmp_path / "merged.old").mkdir()  # the user's own backup, beside it: not preftune's to delete
    (tmp_path / "merged.old" / "model.safetensors").write_bytes(b"kept")
    real_rmtree = checkpoint.shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        if (Path(path) / EXPORT_RECORD).exists() and (Path(path) / "model.safetensors").exists():
            (Path(path) / EXPORT_RECORD).unlink()  # the first file gone, then the kill
            raise Killed
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):
        export(lora_run, merge=True, out=target, base=None)
    monkeypatch.undo()
    assert (target / EXPORT_RECORD).is_file() and (target / "model.safetensors").is_file()
    export(lora_run, merge=True, out=target, base=None)  # the rerun goes through
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "merged.old"], "the old copy is cleared away"
    assert (tmp_path / "merged.old" / "model.safetensors").read_bytes() == b"kept"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_an_adapter_export_names_the_bases_hub_id_and_loads_from_it_elsewhere(lora_run, tiny_llama, hub_cache, tmp_path):
    """final/'s adapter_config.json names the base by its absolute path on the trainer's machine,
    so the adapter published as it is loaded for no one else; --base-id writes a copy naming the id."""
    import json

    import torch
    from preftune_test_data import hub_revision

    from preftune.export_cli import export
    from preftune.lora import peft_module
    from preftune.modeling import load_causal_lm

    hub_revision(hub_cache, "org/tiny", tiny_llama, "c" * 40)  # the Hub, as a reader's cache has it
    final_config = (lora_run / "final" / "adapter_config.json").read_text()
    export(lora_run, merge=False, out=tmp_path / "adapter", base=None, base_id="org/tiny")
    exported = tmp_path / "adapter"
    assert json.loads((exported / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny"
    assert (lora_run / "final" / "adapter_config.json").read_text() == final_config  # the run's own is kept
    card = (exported / "README.md").read_text()
    assert "base_model: org/tiny" in card and "library_name: peft" in card and "their base is `org/tiny`" in card
    assert not (exported / "optimizer.pt").exists()
    ids = torch.tensor([[1, 5, 9, 3]])
    loaded = peft_module().AutoPeftModelForCausalLM.from_pretrained(str(exported)).eval()
    trained = load_causal_lm(str(lora_run / "final")).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, trained(ids).logits, atol=1e-5)


def test_an_adapter_export_of_a_local_base_asks_for_its_hub_id(lora_run):
    from preftune.export_cli import export

    with pytest.raises(UserError, match=r"names the local base .*which loads only on this machine; "
                                        r"add --base-id ORG/NAME"):
        export(lora_run, merge=False, out=None, base=None)
    with pytest.raises(UserError, match=r"^--base-id '/home/me/tiny' is not a hub id"):
        export(lora_run, merge=False, out=None, base=None, base_id="/home/me/tiny")
    assert not (lora_run / "adapter").exists()


def test_a_base_read_from_the_hub_cache_is_written_as_its_id(lora_run, tiny_llama, hub_cache):
    """A base given as its snapshot folder in the cache is named by the id that folder is of."""
    import json

    from preftune_test_data import hub_revision

    from preftune.export_cli import export

    hub_revision(hub_cache, "org/tiny", tiny_llama, "c" * 40)
    snapshot = hub_cache / "models--org--tiny" / "snapshots" / ("c" * 40)
    export(lora_run, merge=False, out=None, base=str(snapshot))
    written = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == "org/tiny"


def test_a_merged_cards_base_id_is_the_hub_id_given(lora_run, tmp_path, capsys):
    from preftune.export_cli import export

    export(lora_run, merge=True, out=tmp_path / "local", base=None)
    assert "so its card gives the Hub no base_model; add --base-id ORG/NAME" in capsys.readouterr().out
    export(lora_run, merge=True, out=tmp_path / "merged", base=None, base_id="org/tiny")
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "base_model: org/tiny" in card and "`org/tiny` trained on preference pairs" in card


def test_a_run_started_over_removes_its_adapter_exports_too(lora_run, tiny_llama, hub_cache):
    """--overwrite left RUN/adapter behind: the earlier run's adapter beside the new run's final/."""
    from preftune_test_data import hub_revision

    from preftune.checkpoint import earlier_run_entries
    from preftune.export_cli import export

    hub_revision(hub_cache, "org/tiny", tiny_llama, "c" * 40)
    export(lora_run, merge=False, out=None, base=None, base_id="org/tiny")
    export(lora_run / "checkpoints" / "step-000001", merge=False, out=None, base=None, base_id="org/tiny")
    entries = earlier_run_entries(lora_run)
    assert "adapter" in entries and "adapter-step-000001" in entries


def test_a_run_from_a_hub_cache_folder_names_its_base_by_hub_id_and_commit(tiny_llama, tiny_model_factory, pairs_file,
                                                                           hub_cache, tmp_path, capsys):
    """final/'s adapter_config.json named the base by its snapshot folder in the trainer's hub
    cache, a path that loads nowhere else, though the card already named the hub id."""
    import json

    import torch
    from preftune_test_data import hub_revision

    from preftune.lora import peft_module
    from preftune.modeling import adapter_base, load_causal_lm

    hub_revision(hub_cache, "org/tiny", tiny_llama, "c" * 40)
    snapshot = hub_cache / "models--org--tiny" / "snapshots" / ("c" * 40)
    train(make_config(tmp_path, snapshot, pairs_file, model={"lora": LORA}, optim={"lr": 1e-2},
                      train={"max_steps": 1, "save_every": 1}))
    final = tmp_path / "run" / "final"
    written = json.loads((final / "adapter_config.json").read_text())
    assert (written["base_model_name_or_path"], written["revision"]) == ("org/tiny", "c" * 40)
    assert "--base-id" not in capsys.readouterr().out  # nothing to add before publishing
    # The Hub's main moves on: the adapter still loads onto the revision it was trained on.
    hub_revision(hub_cache, "org/tiny", tiny_model_factory("llama", seed=1), "d" * 40)
    assert adapter_base(str(final)) == str(snapshot)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        by_peft = peft_module().AutoPeftModelForCausalLM.from_pretrained(str(final)).eval()(ids).logits
        by_preftune = load_causal_lm(str(final)).eval()(ids).logits
    assert torch.allclose(by_peft, by_preftune, atol=1e-5)
    # An export naming another hub id (a copy of the base under the user's name) drops the commit,
    # which is one of org/tiny's; one naming org/tiny keeps it.
    from preftune.export_cli import export

    for base_id, revision in (("me/tiny", None), ("org/tiny", "c" * 40)):
        export(tmp_path / "run", merge=False, out=tmp_path / base_id, base=None, base_id=base_id)
        assert json.loads((tmp_path / base_id / "adapter_config.json").read_text())["revision"] == revision
    # A checkpoint's adapter_config.json names the snapshot folder (only final/ is renamed): its
    # export named org/tiny without the commit, so it loaded onto whatever main is now.
    export(tmp_path / "run" / "checkpoints" / "step-000001", merge=False, out=tmp_path / "step-1", base=None,
           base_id=None)
    written = json.loads((tmp_path / "step-1" / "adapter_config.json").read_text())
    assert (written["base_model_name_or_path"], written["revision"]) == ("org/tiny", "c" * 40)



def test_an_adapter_naming_a_commit_the_cache_lacks_is_refused_not_loaded_on_main(tiny_llama, hub_cache, tmp_path):
    """final/ names its base by hub id and commit; on a machine whose cache holds another commit
    as main (or none), preftune loaded main, a base the adapter was not trained on, where PEFT
    loads the commit."""
    import json

    import pytest
    from preftune_test_data import hub_revision

    from preftune.errors import UserError
    from preftune.modeling import adapter_base

    hub_revision(hub_cache, "org/tiny", tiny_llama, "d" * 40)
    adapter = tmp_path / "final"
    adapter.mkdir()
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps({"base_model_name_or_path": "org/tiny", "revision": "c" * 40}))
    with pytest.raises(UserError) as caught:
        adapter_base(str(adapter))
    assert str(caught.value) == (
        f"{config} names revision {'c' * 40} of org/tiny as the adapter's base, which is not in this machine's "
        "Hugging Face cache, and loading org/tiny would take its main, maybe another model; download that "
        f"revision first (hf download org/tiny --revision {'c' * 40}), then run this again.")
    hub_revision(hub_cache, "org/tiny", tiny_llama, "c" * 40)  # downloaded: that commit's folder
    assert adapter_base(str(adapter)) == str(hub_cache / "models--org--tiny" / "snapshots" / ("c" * 40))
    config.write_text(json.dumps({"base_model_name_or_path": "org/other", "revision": "main"}))
    assert adapter_base(str(adapter)) == "org/other"  # main is what loading the id takes anyway

def test_a_run_from_a_local_base_says_how_to_publish_its_adapter(tiny_llama, pairs_file, tmp_path, capsys):
    """final/'s adapter_config.json names a local base by its absolute path, and nothing said so:
    the adapter published as it was loaded for no one else."""
    train(make_config(tmp_path, tiny_llama, pairs_file, model={"lora": LORA}, train={"max_steps": 1}))
    run = tmp_path / "run"
    said = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert (f"{run / 'final' / 'adapter_config.json'} names its base by the local folder {tiny_llama}, which loads "
            f"on this machine only; to publish the adapter, `preftune export {run} --base-id ORG/NAME` writes a "
            "copy naming the base's hub id (or --merge, a model that needs no base).") in said
    card = (run / "final" / "README.md").read_text()
    assert ("Its `adapter_config.json` names that base by a folder on the machine that trained it; `preftune export "
            "RUN --base-id ORG/NAME` writes a copy naming the base's hub id, which loads anywhere.") in card
