"""pi_sft at the quick size: it trains, saves a loadable folder, and its samples spread."""

import hashlib
import io
import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.demo import world
from preftune.demo.pretrain import (
    PROGRESS_FILE,
    QUICK,
    learning_rate_at,
    pretrain_sft,
    reward_spread,
)

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

    from preftune.demo.pipeline import pi_sft_is_complete
    from preftune.errors import UserError

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(UserError, match=r"out of disk space while writing .*pretrain\.json; .*free some space"):
        pretrain_sft(tmp_path, replace(QUICK, steps=2))
    assert not (tmp_path / "pretrain.json").exists()
    assert not pi_sft_is_complete(tmp_path)  # so the rerun trains it again


def saved_weights(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def assert_same_weights(folder, expected_folder):
    weights, expected = saved_weights(folder), saved_weights(expected_folder)
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name


def stop_at_step(monkeypatch, stop):
    """Ctrl-C as training reaches step `stop` (0-based), before that step runs."""
    from preftune.demo import pretrain

    def learning_rate_or_stop(step, config):
        if step == stop:
            raise KeyboardInterrupt
        return learning_rate_at(step, config)

    monkeypatch.setattr(pretrain, "learning_rate_at", learning_rate_or_stop)


def test_pi_sft_stopped_mid_training_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    # A demo stopped during pi_sft's training trained it again from step 0 on the rerun (a minute
    # at full size). It now saves every `every` steps and resumes from the last save, bit-exact.
    from preftune.demo import pretrain

    config = replace(QUICK, steps=6)
    whole = pretrain_sft(tmp_path / "whole", config, echo=pytest.fail, every=2)

    stop_at_step(monkeypatch, 5)  # saved after steps 2 and 4, so step 4 is done again
    with pytest.raises(KeyboardInterrupt):
        pretrain_sft(tmp_path / "stopped", config, echo=pytest.fail, every=2)
    assert (tmp_path / "stopped" / PROGRESS_FILE).is_file()
    assert not (tmp_path / "stopped" / "pretrain.json").exists()
    monkeypatch.undo()

    notes, steps_run = [], []
    monkeypatch.setattr(pretrain, "learning_rate_at",
                        lambda step, config: steps_run.append(step) or learning_rate_at(step, config))
    resumed = pretrain_sft(tmp_path / "stopped", config, echo=notes.append, every=2)
    assert len(notes) == 1 and notes[0].startswith("resuming pi_sft's training at step 4 of 6")
    assert steps_run == [4, 5]
    assert resumed["losses"] == whole["losses"]
    assert_same_weights(tmp_path / "stopped", tmp_path / "whole")
    assert not (tmp_path / "stopped" / PROGRESS_FILE).exists()  # pi_sft complete: nothing to resume


def with_checksum(payload):
    return hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def torch_bytes(value):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("damage, reason", [
    (lambda saved: saved[:len(saved) // 2], "its checksum does not match"),  # cut short
    (lambda saved: saved[:-9] + bytes([saved[-9] ^ 1]) + saved[-8:], "its checksum does not match"),
    (lambda saved: b"", "its checksum does not match"),
    (lambda saved: with_checksum(b"not torch's format"), ""),
    (lambda saved: with_checksum(torch_bytes({"step": 1})), "entries are missing"),
])
def test_a_damaged_partial_pi_sft_checkpoint_is_one_note_and_a_fresh_start(
        tmp_path, monkeypatch, damage, reason):
    config = replace(QUICK, steps=3)
    pretrain_sft(tmp_path / "whole", config, echo=pytest.fail, every=1)
    stop_at_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        pretrain_sft(tmp_path / "stopped", config, echo=pytest.fail, every=1)
    monkeypatch.undo()
    progress = tmp_path / "stopped" / PROGRESS_FILE
    progress.write_bytes(damage(progress.read_bytes()))

    notes = []
    pretrain_sft(tmp_path / "stopped", config, echo=notes.append, every=1)
    assert len(notes) == 1 and "\n" not in notes[0], notes
    assert notes[0].startswith(f"ignored {progress}, a damaged partial pi_sft checkpoint ({reason}")
    assert notes[0].endswith("; training pi_sft from the start")
    assert_same_weights(tmp_path / "stopped", tmp_path / "whole")


def test_a_partial_pi_sft_of_other_settings_is_not_resumed(tmp_path, monkeypatch):
    stop_at_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        pretrain_sft(tmp_path, replace(QUICK, steps=3), echo=pytest.fail, every=1)
    monkeypatch.undo()

    notes = []
    other = replace(QUICK, steps=3, seed=1)
    pretrain_sft(tmp_path, other, echo=notes.append, every=1)
    assert notes == [f"ignored {tmp_path / PROGRESS_FILE}: it is the partial training of a pi_sft "
                     "with other settings (or another tokenizer); training pi_sft from the start"]
    assert json.loads((tmp_path / "pretrain.json").read_text())["config"]["seed"] == 1


def test_demo_step_2_says_it_resumes_pi_sft_then_keeps_the_finished_one(tmp_path, monkeypatch):
    from preftune.demo.pipeline import QUICK_SIZES, DemoPaths, train_pi_sft
    from preftune.demo.pretrain import CHECKPOINT_EVERY

    paths = DemoPaths(tmp_path)
    sizes = replace(QUICK_SIZES, pretrain=replace(QUICK, steps=CHECKPOINT_EVERY + 2))
    stop_at_step(monkeypatch, CHECKPOINT_EVERY + 1)
    with pytest.raises(KeyboardInterrupt):
        train_pi_sft(paths, sizes, progress=False, echo=pytest.fail)
    monkeypatch.undo()

    notes = []
    train_pi_sft(paths, sizes, progress=False, echo=notes.append)
    assert notes == [f"      resuming pi_sft's training at step {CHECKPOINT_EVERY} of "
                     f"{CHECKPOINT_EVERY + 2}, where the earlier run saved it "
                     f"({paths.pi_sft / PROGRESS_FILE})"]
    finished = saved_weights(paths.pi_sft)

    # Stopped between pretrain.json and the removal of the progress file: pi_sft is complete.
    (paths.pi_sft / PROGRESS_FILE).write_bytes(b"left over")
    note = train_pi_sft(paths, sizes, progress=False, echo=pytest.fail)
    assert note == f"kept the pi_sft already in {paths.pi_sft}"
    assert not (paths.pi_sft / PROGRESS_FILE).exists()
    assert all(torch.equal(t, finished[n]) for n, t in saved_weights(paths.pi_sft).items())
