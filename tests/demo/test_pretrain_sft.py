"""pi_sft at the quick size: it trains, saves a loadable folder, and its samples spread."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.demo import world
from preftune.demo.pretrain import QUICK, learning_rate_at, pretrain_sft, reward_spread

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_quick_pi_sft_samples_have_a_wide_reward_spread(tmp_path):
    summary = pretrain_sft(tmp_path, QUICK)
    assert summary["final_loss"] < summary["losses"][0] / 3  # it learned the world's grammar
    assert json.loads((tmp_path / "pretrain.json").read_text())["config"] == summary["config"]

    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    review = world.make_reviews(1, seed=9)[0]
    assert tokenizer.decode(tokenizer(review)["input_ids"]) == review
    assert tokenizer.chat_template

    spread = reward_spread(model, tokenizer, world.make_prompts(40, "heldout"), max_new_tokens=40)
    assert spread["std"] > 1.0
    assert spread["positive"] > 0.2 and spread["negative"] > 0.2
    assert spread["pair_differs"] > 0.5
    # Samples use the world's words: most of them are in the vocabulary of its reviews.
    vocabulary = {w for r in world.make_reviews(2000) for w in world.words(r)}
    sampled = [w for text in spread["examples"] for w in world.words(text)]
    assert sum(w in vocabulary for w in sampled) / len(sampled) > 0.9


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    peak = QUICK.learning_rate
    assert learning_rate_at(0, QUICK) == peak / QUICK.warmup_steps
    assert learning_rate_at(QUICK.warmup_steps, QUICK) == peak
    assert abs(learning_rate_at(QUICK.steps, QUICK) - peak / 10) < 1e-12


def test_a_full_disk_at_pretrain_json_leaves_pi_sft_to_be_trained_again(tmp_path, monkeypatch):
    # pretrain.json marks pi_sft complete and the next demo reads it back. It was written in
    # place: a full disk printed an OSError traceback and could leave an empty pretrain.json,
    # which the rerun took for a finished pi_sft and failed to parse.
    import errno
    import os
    from dataclasses import replace

    from preftune.demo.pipeline import pi_sft_is_complete
    from preftune.errors import UserError

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(UserError, match=r"out of disk space while writing .*pretrain\.json; .*free some space"):
        pretrain_sft(tmp_path, replace(QUICK, steps=2))
    assert not (tmp_path / "pretrain.json").exists()
    assert not pi_sft_is_complete(tmp_path)  # so the rerun trains it again
