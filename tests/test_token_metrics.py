"""Per-token statistics of the logits (token_stats.py) and the metrics built on them
(train.token_metrics: TRL's `entropy`, `mean_token_accuracy`, `logits/chosen`, `logits/rejected`).

Every layout and log-prob path of tests/test_ld_wpo.py is held to `direct`, the statistics worked
out here from the full (2B, T, V) logits of a padded batch with TRL's completion masks.
"""

import math

import pytest
import torch
from preftune_test_data import make_config, read_metrics
from test_ld_wpo import PAIRS, PATHS, _model

from preftune.data.collate import collate_pairs
from preftune.data.tokenize import TokenizedPair
from preftune.losses import PairLogps
from preftune.metrics import StepMetrics
from preftune.token_stats import (
    ENTROPY,
    MEAN_LOGIT,
    TOKEN_METRIC_STATS,
    TOP1,
    WPO,
    chunk_token_stats,
)
from preftune.train import train


def _greedy(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def pairs_the_model_partly_predicts(model):
    """PAIRS with the first two tokens of each chosen response replaced by the model's own greedy
    choices: top1 then counts some chosen tokens and misses the others (the tiny model's top
    choice is none of PAIRS' tokens)."""
    pairs = []
    for p in PAIRS:
        start = _greedy(model, p.prompt_ids, min(2, len(p.chosen_ids)))
        pairs.append(TokenizedPair(p.prompt_ids, start + p.chosen_ids[len(start):], p.rejected_ids, index=p.index))
    return pairs


def _full_logits(model, pairs):
    """Logits (2B, T-1, V) of a padded batch, the tokens they predict and TRL's completion mask."""
    batch = collate_pairs(pairs, pad_token_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    return logits, batch.input_ids[:, 1:], batch.completion_mask[:, 1:].bool()


def direct(model, pairs):
    """{statistic: per-sequence sum over completion tokens (2B,)} from the full logits."""
    logits, targets, mask = _full_logits(model, pairs)
    log_p = logits.log_softmax(-1)  # (2B, T-1, V)
    per_token = {
        "entropy": -(log_p.exp() * log_p).sum(-1),
        "mean_logit": logits.sum(-1) / logits.shape[-1],
        "top1": (logits.argmax(-1) == targets).float(),
    }
    return {name: (value * mask).sum(1) for name, value in per_token.items()}


def direct_metrics(model, pairs):
    """The four metrics as TRL 1.16 defines them: over the completion-mask tokens of the batch,
    entropy over chosen and rejected, logits/* per half, accuracy over chosen tokens."""
    logits, targets, mask = _full_logits(model, pairs)
    b = len(pairs)
    p = logits.softmax(-1)
    entropy = -(p * p.log()).sum(-1)  # (2B, T-1)
    mean_logit = logits.mean(-1)
    correct = (logits.argmax(-1) == targets).float()
    return {"entropy": entropy[mask].mean().item(),
            "logits/chosen": mean_logit[:b][mask[:b]].mean().item(),
            "logits/rejected": mean_logit[b:][mask[b:]].mean().item(),
            "mean_token_accuracy": correct[:b][mask[:b]].mean().item()}


def _step_metrics(sums, counts, stat_sums, pair_weights=None):
    """What StepMetrics logs for one micro-batch of these per-sequence results."""
    b = sums.shape[0] // 2
    zeros = torch.zeros(b)
    logps = PairLogps(sums[:b].detach(), sums[b:].detach(), zeros, zeros, counts[:b], counts[b:],
                      pair_weights=pair_weights, token_stat_sums=stat_sums)
    metrics = StepMetrics("cpu", wpo=pair_weights is not None, token_metrics=True)
    metrics.add(torch.zeros(b), logps, beta=0.1)
    return metrics.reduce()


@pytest.mark.parametrize("with_wpo_and_ld", [False, True], ids=["alone", "with wpo and ld"])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_gives_the_statistics_and_metrics_of_the_full_logits(path, with_wpo_and_ld):
    layout, options, chunk = PATHS[path]
    model = _model(**options)
    pairs = pairs_the_model_partly_predicts(model)
    expected = direct(model, pairs)
    assert expected["top1"][:3].sum() >= 3 and expected["top1"][3:].sum() == 0  # chosen tokens hit, not all
    stats = (WPO, *TOKEN_METRIC_STATS) if with_wpo_and_ld else TOKEN_METRIC_STATS
    ld = 0.3 if with_wpo_and_ld else None  # LD-DPO discounts the log-probs, never the statistics
    sums, counts, got = layout(model, ld, stats, chunk, pairs)
    assert set(got) == set(stats)
    for name in TOKEN_METRIC_STATS:
        assert not got[name].requires_grad
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)
    assert sums.requires_grad  # the log-probs still train
    logged = _step_metrics(sums, counts, {name: got[name] for name in TOKEN_METRIC_STATS})
    metrics = direct_metrics(model, pairs)
    assert 0 < metrics["mean_token_accuracy"] < 1
    for key, value in metrics.items():
        assert logged[key] == pytest.approx(value, abs=1e-5), key


# ------------------------------------------------------------------------------ by hand


def test_token_statistics_by_hand():
    # Logits (0, 0, log 2): p = (1/4, 1/4, 1/2); entropy = 2 * 1/4 log 4 + 1/2 log 2 = 1.5 log 2;
    # mean logit log(2) / 3; the top choice is token 2. Logits (1, 1, 0): a tie between tokens 0
    # and 1, which counts token 0 (the first maximum, as TRL and torch.argmax), not token 1.
    logits = torch.tensor([[0.0, 0.0, math.log(2)], [0.0, 0.0, math.log(2)], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    targets = torch.tensor([2, 0, 0, 1])
    entropy, mean_logit, top1 = chunk_token_stats(logits, targets, TOKEN_METRIC_STATS)
    torch.testing.assert_close(entropy[:2], torch.full((2,), 1.5 * math.log(2)))
    torch.testing.assert_close(mean_logit, torch.tensor([math.log(2) / 3] * 2 + [2 / 3] * 2))
    assert top1.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_step_metrics_average_tokens_and_pairs_by_hand():
    # Two micro-batches of one pair each. Chosen tokens: 3 then 1; rejected: 2 then 2.
    first = {ENTROPY: torch.tensor([6.0, 2.0]), MEAN_LOGIT: torch.tensor([0.3, -0.4]), TOP1: torch.tensor([2.0, 1.0])}
    second = {ENTROPY: torch.tensor([1.0, 3.0]), MEAN_LOGIT: torch.tensor([0.5, 0.8]), TOP1: torch.tensor([0.0, 2.0])}
    metrics = StepMetrics("cpu", wpo=True, token_metrics=True)
    for stats, chosen, rejected, weight in ((first, 3, 2, 0.5), (second, 1, 2, 2.0)):
        zero = torch.zeros(1)
        logps = PairLogps(zero, zero, zero, zero, torch.tensor([chosen]), torch.tensor([rejected]),
                          pair_weights=torch.tensor([weight]), token_stat_sums=stats)
        metrics.add(torch.zeros(1), logps, beta=0.1)
    got = metrics.reduce()
    assert got["entropy"] == pytest.approx((6 + 2 + 1 + 3) / 8)  # all 8 tokens alike
    assert got["logits/chosen"] == pytest.approx((0.3 + 0.5) / 4)  # 4 chosen tokens
    assert got["logits/rejected"] == pytest.approx((-0.4 + 0.8) / 4)
    assert got["mean_token_accuracy"] == pytest.approx((2 + 0) / 4)  # chosen tokens only
    assert got["wpo/weight"] == pytest.approx((0.5 + 2.0) / 2)  # the pairs' mean weight
    assert got["loss"] == 0.0
    plain = StepMetrics("cpu").reduce()
    assert not {"entropy", "wpo/weight"} & set(plain) and plain["loss"] == 0.0
    assert StepMetrics("cpu", token_metrics=True).reduce()["entropy"] == 0.0  # no tokens: 0, as TRL


# ------------------------------------------------------------------------------ training


def test_token_metrics_are_logged_and_independent_of_accumulation(tmp_path, tiny_llama, pairs_file):
    """Train and eval lines carry the four metrics, averaged over the step's tokens: 4 pairs as
    1 micro-batch or as 4 micro-batches of 1 log the same values. The default logs none."""
    def run(out, batch_size, grad_accum, **train_extra):
        cfg = make_config(tmp_path, tiny_llama, pairs_file, out, data={"eval_fraction": 0.25},
                          train={"batch_size": batch_size, "grad_accum": grad_accum, "max_steps": 2,
                                 "eval_every": 2, **train_extra})
        train(cfg)
        return read_metrics(tmp_path / out), read_metrics(tmp_path / out, "eval/loss")

    whole, whole_eval = run("whole", 4, 1, token_metrics=True)
    split, _ = run("split", 1, 4, token_metrics=True)
    plain, plain_eval = run("plain", 4, 1)
    keys = ("entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected")
    for a, b, c in zip(whole, split, plain):
        for key in keys:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
            assert key not in c
        assert a["loss"] == pytest.approx(c["loss"], abs=1e-6)  # metrics only: training unchanged
    assert whole[0]["entropy"] > 1.0  # a tiny random model is unsure: near log(vocabulary)
    assert all(f"eval/{key}" in whole_eval[-1] for key in keys)
    assert not any(f"eval/{key}" in plain_eval[-1] for key in keys)


def test_wpo_weight_is_logged_as_the_pairs_mean_weight(tmp_path, tiny_llama, pairs_file):
    """At the first step the policy is the reference: every margin is 0, DPO's loss ln 2, and
    WPO's loss ln 2 times each pair's weight, so the step's mean loss is ln 2 x the mean weight."""
    cfg = make_config(tmp_path, tiny_llama, pairs_file, loss={"wpo_weighting": True},
                      train={"batch_size": 2, "grad_accum": 2, "max_steps": 2})
    train(cfg)
    first = read_metrics(tmp_path / "run")[0]
    assert first["wpo/weight"] == pytest.approx(first["loss"] / math.log(2), rel=1e-6)
    assert abs(first["wpo/weight"] - 1.0) > 1e-3  # not a weight of 1 by accident
    plain = make_config(tmp_path, tiny_llama, pairs_file, "plain")
    train(plain)
    assert "wpo/weight" not in read_metrics(tmp_path / "plain")[0]


def test_a_step_with_token_metrics_never_waits_for_the_device(tmp_path, tiny_llama, pairs_file, monkeypatch):
    from test_host_work import device_waits_in_steps

    config = make_config(tmp_path, tiny_llama, pairs_file, data={"share_prompt": False},
                         train={"max_steps": 2, "token_metrics": True}, loss={"wpo_weighting": True})
    waits = device_waits_in_steps(config, monkeypatch)
    assert "entropy" in read_metrics(tmp_path / "run")[0]
    assert not waits, "".join(waits[0])


@pytest.mark.parametrize("token_metrics", [False, True])
def test_the_statistics_run_only_when_asked_for(tmp_path, tiny_llama, pairs_file, monkeypatch, token_metrics):
    """The default step never computes the token statistics: no argmax (top1), no softmax
    (entropy) reaches a backend; train.token_metrics runs both."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import preftune.train as train_module

    seen = set()

    class Operators(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    original = train_module.train_step

    def step_seen(*args, **kwargs):
        with Operators():
            return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", step_seen)
    train(make_config(tmp_path, tiny_llama, pairs_file, train={"max_steps": 1, "token_metrics": token_metrics}))
    statistics = {"aten.argmax", "aten._softmax"}
    assert statistics & seen == (statistics if token_metrics else set())
