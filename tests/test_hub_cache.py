"""Hub ids read from a Hugging Face cache filled earlier, offline (HF_HUB_OFFLINE=1, conftest),
as on a cluster without network: the cache is laid out here as the Hub's download leaves it."""

from __future__ import annotations

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
