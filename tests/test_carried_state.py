"""State carried across optimizer steps: TR-DPO's moving reference (model.reference_sync) and
BCO's running mean of the implicit rewards (loss.type bco_pair). Each is checked by hand, in a
run, across a resume, and against TRL 1.16 where TRL has the same thing.

The hand-worked pair of tests/test_losses.py: policy chosen/rejected log-probs -10 / -12,
reference -11 / -11, so the log-ratios are 1 and -1; with beta 0.1 the implicit rewards are
r_w = 0.1 and r_l = -0.1.
"""

import functools
import math
from pathlib import Path

import pytest
import torch
from preftune_test_data import make_config, read_metrics
from safetensors.torch import load_file
from torch import nn

from preftune.carried_state import next_reward_shift, sync_reference
from preftune.config import LossConfig, validate_config
from preftune.errors import UserError
from preftune.losses import LOSSES, PairLogps, preference_loss
from preftune.train import train


def pair(pc=-10.0, pr=-12.0, rc=-11.0, rr=-11.0, lc=4, lr=2):
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return PairLogps(t(pc), t(pr), t(rc), t(rr), torch.tensor([lc]), torch.tensor([lr]))


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def checkpoint(run, step):
    return Path(run) / "checkpoints" / f"step-{step:06d}"


# ------------------------------------------------------------------------------ BCO by hand


def test_bco_pair_by_hand():
    cfg = LossConfig(type="bco_pair", beta=0.1)
    # delta = 0: -log sigmoid(0.1) - log sigmoid(0.1) = 2 log(1 + e^-0.1) = 2 x 0.644397
    assert LOSSES["bco_pair"](pair(), cfg).item() == pytest.approx(1.288793, abs=1e-6)
    # delta = 0.05: -log sigmoid(0.1 - 0.05) - log sigmoid(0.05 + 0.1) = 0.668460 + 0.620957
    assert LOSSES["bco_pair"](pair(), cfg, 0.05).item() == pytest.approx(1.289417, abs=1e-6)
    # policy == reference and delta = 0 (the first step): 2 ln 2
    same = pair(pc=-7.0, pr=-9.0, rc=-7.0, rr=-9.0)
    assert LOSSES["bco_pair"](same, cfg).item() == pytest.approx(2 * math.log(2), abs=1e-12)


def test_mpo_weights_and_the_shift_reach_only_bco_pair():
    mpo = LossConfig(type=["sigmoid", "bco_pair", "sft"], weights=[0.8, 0.2, 1.0], beta=0.1)
    # 0.8 x 0.598139 (DPO at beta h = 0.2) + 0.2 x 1.289417 (delta 0.05) + 1.0 x 10 / 4
    assert preference_loss(pair(), mpo, 0.05).item() == pytest.approx(3.236394, abs=1e-6)
    sigmoid = LossConfig(type="sigmoid", beta=0.1)
    assert preference_loss(pair(), sigmoid, 5.0).item() == pytest.approx(0.598139, abs=1e-6)


def test_the_running_mean_averages_every_reward_so_far():
    shift, seen = 0.0, 0  # before the first step
    shift, seen = next_reward_shift(shift, seen, 0.2, 8)  # a step of 4 pairs, mean reward 0.2
    assert (shift, seen) == (pytest.approx(0.2), 8)
    shift, seen = next_reward_shift(shift, seen, -0.1, 8)
    assert (shift, seen) == (pytest.approx(0.05), 16)  # (8 x 0.2 + 8 x -0.1) / 16
    shift, seen = next_reward_shift(shift, seen, 0.5, 16)
    assert (shift, seen) == (pytest.approx(0.275), 32)  # (1.6 - 0.8 + 8) / 32


def test_a_run_shifts_each_step_by_the_mean_reward_of_the_steps_before(tmp_path, tiny_llama, pairs_file,
                                                                      monkeypatch):
    import preftune.train as train_module

    given = []  # the delta each micro-batch's loss received

    def recording(logps, cfg, reward_shift=0.0):
        given.append(reward_shift)
        return preference_loss(logps, cfg, reward_shift)

    monkeypatch.setattr(train_module, "preference_loss", recording)
    cfg = make_config(tmp_path, tiny_llama, pairs_file, loss={"type": "bco_pair"},
                      train={"max_steps": 3, "batch_size": 2, "grad_accum": 2})
    train(cfg)
    rows = read_metrics(tmp_path / "run")
    step_means = [(m["rewards/chosen"] + m["rewards/rejected"]) / 2 for m in rows]
    assert rows[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-6)  # policy == reference
    expected = [0.0, step_means[0], (step_means[0] + step_means[1]) / 2]  # steps of equal size
    assert [m["bco/reward_shift"] for m in rows] == pytest.approx(expected, abs=1e-12)
    assert expected[2] != 0
    # Both micro-batches of a step get the step's delta: accumulation stays a bigger batch.
    assert given == pytest.approx([d for d in expected for _ in range(2)], abs=1e-12)


def test_bco_reward_shift_none_is_a_zero_shift(tmp_path, tiny_llama, pairs_file, monkeypatch):
    import preftune.train as train_module

    given = []
    monkeypatch.setattr(train_module, "preference_loss",
                        lambda logps, cfg, shift=0.0: given.append(shift) or preference_loss(logps, cfg, shift))
    train(make_config(tmp_path, tiny_llama, pairs_file, loss={"type": "bco_pair", "bco_reward_shift": "none"}))
    assert given == [0.0, 0.0]
    assert "bco/reward_shift" not in read_metrics(tmp_path / "run")[-1]


# ------------------------------------------------------------------------------ TR-DPO by hand


def test_sync_is_alpha_policy_plus_one_minus_alpha_reference():
    policy, reference = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        policy.weight.copy_(torch.tensor([[3.0, 6.0]]))
        reference.weight.copy_(torch.tensor([[1.0, 2.0]]))
    sync_reference(policy, reference, 0.25)
    assert reference.weight.tolist() == [[1.5, 3.0]]  # 0.25 x [3, 6] + 0.75 x [1, 2]
    sync_reference(policy, reference, 1.0)
    assert reference.weight.tolist() == [[3.0, 6.0]]  # the hard update: the policy itself
    assert policy.weight.tolist() == [[3.0, 6.0]]


def test_the_reference_moves_only_at_syncs(tmp_path, tiny_llama, pairs_file):
    cfg = make_config(tmp_path, tiny_llama, pairs_file, model={"reference_sync": {"every": 2, "alpha": 0.5}},
                      train={"max_steps": 3, "save_every": 1})
    train(cfg)
    start, run = weights(tiny_llama), tmp_path / "run"
    assert not (checkpoint(run, 1) / "reference").exists()  # before the first sync: the start
    policy_2, reference_2 = weights(checkpoint(run, 2)), weights(checkpoint(run, 2) / "reference")
    reference_3 = weights(checkpoint(run, 3) / "reference")
    for name, start_value in start.items():
        torch.testing.assert_close(reference_2[name], 0.5 * policy_2[name] + 0.5 * start_value)
        assert torch.equal(reference_3[name], reference_2[name]), name  # no sync at step 3
    assert any(not torch.equal(reference_2[n], start[n]) for n in start)


def test_a_hard_sync_after_every_step_makes_every_step_start_at_ln2(tmp_path, tiny_llama, pairs_file):
    """alpha = 1 after each step: each step starts with policy == reference, so the live reference
    (not only the saved one) is the synced one."""
    cfg = make_config(tmp_path, tiny_llama, pairs_file, model={"reference_sync": {"every": 1, "alpha": 1.0}},
                      train={"max_steps": 3, "save_every": 1})
    train(cfg)
    for row in read_metrics(tmp_path / "run"):
        assert row["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert row["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    for step in (1, 2, 3):
        policy, reference = weights(checkpoint(tmp_path / "run", step)), weights(checkpoint(tmp_path / "run", step)
                                                                              / "reference")
        assert all(torch.equal(policy[n], reference[n]) for n in policy), step
    # `preftune eval pairs --reference CHECKPOINT/reference` scores against the moved reference.
    from preftune.evaluate import evaluate_pairs_file

    moved = evaluate_pairs_file(tmp_path / "run" / "final", pairs_file,
                                reference_path=checkpoint(tmp_path / "run", 3) / "reference")
    assert moved["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)


# ------------------------------------------------------------------------------ resume


def test_resume_across_a_sync_with_bco_pair_equals_uninterrupted(tmp_path, tiny_llama, pairs_file):
    """Checkpoint at step 3: after the sync at step 2 (the reference is no longer the start) and
    with a non-zero reward shift; the syncs at steps 4 and 6 happen after the resume."""
    mpo = {"type": ["sigmoid", "bco_pair", "sft"], "weights": [0.8, 0.2, 1.0]}
    sync = {"reference_sync": {"every": 2, "alpha": 0.6}}
    common = {"batch_size": 2, "save_every": 3, "max_steps": 6}
    train(make_config(tmp_path, tiny_llama, pairs_file, "whole", loss=mpo, model=sync, train=common))
    train(make_config(tmp_path, tiny_llama, pairs_file, "part", loss=mpo, model=sync,
                      train={**common, "max_steps": 3}))
    train(make_config(tmp_path, tiny_llama, pairs_file, "part", loss=mpo, model=sync, train=common),
          resume=str(checkpoint(tmp_path / "part", 3)))
    whole, part = weights(tmp_path / "whole" / "final"), weights(tmp_path / "part" / "final")
    for name in whole:
        assert torch.equal(whole[name], part[name]), name
    rows_whole, rows_part = read_metrics(tmp_path / "whole"), {m["step"]: m for m in read_metrics(tmp_path / "part")}
    assert rows_whole[3]["bco/reward_shift"] != 0
    for row in rows_whole:
        assert rows_part[row["step"]]["loss"] == row["loss"]
        assert rows_part[row["step"]]["bco/reward_shift"] == row["bco/reward_shift"]


def test_reference_sync_under_fsdp_matches_one_plain_process(tmp_path, tiny_llama, pairs_file):
    """fsdp on one process: the sync works on the sharded parameters, and the checkpoint holds the
    reference gathered whole, as without fsdp."""
    import torch.distributed as torch_dist

    sync = {"reference_sync": {"every": 2, "alpha": 0.5}}
    for out, distributed in (("plain", "none"), ("fsdp", "fsdp")):
        try:
            train(make_config(tmp_path, tiny_llama, pairs_file, out, model=sync,
                              train={"max_steps": 3, "save_every": 2, "distributed": distributed}))
        finally:
            if torch_dist.is_initialized():
                torch_dist.destroy_process_group()
    start, fsdp_2 = weights(tiny_llama), checkpoint(tmp_path / "fsdp", 2)
    policy_2, reference_2 = weights(fsdp_2), weights(fsdp_2 / "reference")
    for name, start_value in start.items():
        torch.testing.assert_close(reference_2[name], 0.5 * policy_2[name] + 0.5 * start_value)
    # As tests/distributed holds fsdp to plain training: within 1e-4 (rounding differs).
    for folder in ("final", "checkpoints/step-000002/reference"):
        plain, sharded = weights(tmp_path / "plain" / folder), weights(tmp_path / "fsdp" / folder)
        for name in plain:
            torch.testing.assert_close(sharded[name], plain[name], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("model, loss, says", [
    ({"reference": "precompute"}, {}, "cannot follow a moving reference"),
    ({"reference": "none"}, {"type": "simpo"}, "model.reference: none trains without a reference"),
    ({}, {"reference_free": True}, "loss.reference_free: true trains without a reference"),
    ({}, {"type": ["simpo", "sft"]}, "never reads the reference"),
    ({"lora": {"r": 4}}, {}, "moving it would move the policy too"),
])
def test_reference_sync_where_the_reference_cannot_move_is_one_sentence(model, loss, says):
    raw = {"model": {"path": "m", "reference_sync": {"every": 8}, **model}, "data": {"train": "d.jsonl"},
           "loss": loss}
    with pytest.raises(UserError, match=f"model.reference_sync moves the reference during training, but .*{says}"):
        validate_config(raw)


@pytest.mark.parametrize("setting", [{"alpha": 0.0}, {"alpha": 1.5}, {"every": 0}])
def test_reference_sync_values_out_of_range_name_the_key(setting):
    raw = {"model": {"path": "m", "reference_sync": setting}, "data": {"train": "d.jsonl"}}
    with pytest.raises(UserError, match=f"model.reference_sync.{next(iter(setting))}"):
        validate_config(raw)


def test_trl_names_of_the_sync_point_to_reference_sync():
    raw = {"model": {"path": "m", "ref_model_mixup_alpha": 0.6}, "data": {"train": "d.jsonl"}}
    with pytest.raises(UserError, match="preftune's is model.reference_sync.alpha"):
        validate_config(raw)


def test_bco_reward_shift_without_bco_pair_is_refused():
    with pytest.raises(ValueError, match="loss.bco_reward_shift is none, but loss.type sigmoid does not use it"):
        LossConfig(type="sigmoid", bco_reward_shift="none")


def test_a_reference_path_of_another_shape_cannot_be_synced(tmp_path, tiny_model_factory, pairs_file):
    wider = tiny_model_factory("llama", hidden_size=32)
    cfg = make_config(tmp_path, tiny_model_factory("llama"), pairs_file,
                      model={"reference_path": str(wider), "reference_sync": {"every": 2}})
    with pytest.raises(UserError, match="model.reference_sync mixes .* has other parameters than the policy"):
        train(cfg)


# ------------------------------------------------------------------------------ TRL 1.16


@pytest.mark.slow
@pytest.mark.parametrize("loss", [{"type": "bco_pair", "bco_reward_shift": "none"},
                                  {"type": ["sigmoid", "bco_pair"], "weights": [0.8, 0.2],
                                   "bco_reward_shift": "none"}])
def test_bco_pair_without_the_shift_matches_trl(loss, tmp_path, tiny_model_factory):
    """TRL 1.16's bco_pair has no reward shift (delta = 0): bco_reward_shift none is that loss."""
    pytest.importorskip("trl")
    from test_trl_parity import UNEVEN, assert_steps_match, run_preftune, run_trl

    policy_dir, reference_dir = tiny_model_factory("qwen2", seed=0), tiny_model_factory("qwen2", seed=1)
    ours = run_preftune(policy_dir, reference_dir, tmp_path, rows=UNEVEN, loss=loss)
    theirs = run_trl(policy_dir, reference_dir, tmp_path, rows=UNEVEN, loss=loss)
    assert_steps_match(ours, theirs)


@pytest.mark.slow
def test_reference_sync_matches_trl_sync_ref_model(tmp_path, tiny_model_factory, monkeypatch):
    """TRL's sync_ref_model after every step with mixup alpha 0.5, against model.reference_sync
    {every: 1, alpha: 0.5}: steps 2 and 3 score against the moved reference."""
    trl = pytest.importorskip("trl")
    import test_trl_parity
    from test_trl_parity import assert_steps_match, run_preftune, run_trl

    monkeypatch.setattr(trl, "DPOConfig", functools.partial(
        trl.DPOConfig, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5))

    def with_sync(raw, *args, **kwargs):
        raw["model"]["reference_sync"] = {"every": 1, "alpha": 0.5}
        return validate_config(raw, *args, **kwargs)

    monkeypatch.setattr(test_trl_parity, "validate_config", with_sync)
    policy_dir, reference_dir = tiny_model_factory("qwen2", seed=0), tiny_model_factory("qwen2", seed=1)
    ours = run_preftune(policy_dir, reference_dir, tmp_path, lr=1e-2)
    theirs = run_trl(policy_dir, reference_dir, tmp_path, lr=1e-2)
    assert_steps_match(ours, theirs)


@pytest.mark.slow
def test_reference_sync_under_compile_trains_like_eager(tmp_path, tiny_llama, pairs_file):
    """The compiled module is the policy's; the reference runs eagerly and is updated in place,
    which leaves the policy's graph whole."""
    from torch._dynamo.utils import counters

    sync = {"reference_sync": {"every": 1, "alpha": 0.5}}
    train(make_config(tmp_path, tiny_llama, pairs_file, "eager", model=sync, train={"max_steps": 3}))
    counters.clear()
    train(make_config(tmp_path, tiny_llama, pairs_file, "compiled", model={**sync, "compile": True},
                      train={"max_steps": 3}))
    for a, b in zip(read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-4)
    assert dict(counters["graph_break"]) == {}
