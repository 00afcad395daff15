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
