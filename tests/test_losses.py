"""Every loss against numbers worked out by hand in the test.

One pair with policy chosen/rejected log-probs -10 / -12, reference -11 / -11, so
logratio_chosen = 1, logratio_rejected = -1, logratio_margin h = 2; lengths 4 and 2.
"""

import math

import pytest
import torch

from preftune.config import LossConfig, validate_config
from preftune.errors import UserError
from preftune.losses import LOSSES, PairLogps, implicit_rewards, preference_loss


def pair(pc=-10.0, pr=-12.0, rc=-11.0, rr=-11.0, lc=4, lr=2):
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return PairLogps(t(pc), t(pr), t(rc), t(rr), torch.tensor([lc]), torch.tensor([lr]))


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def value(name, logps=None, **cfg):
    return LOSSES[name](logps or pair(), LossConfig(type=name, **cfg)).item()


def test_sigmoid_is_dpo_eq7():
    # beta h = 0.1 * 2 = 0.2; -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598139
    assert value("sigmoid", beta=0.1) == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-12)
    assert value("sigmoid", beta=0.1) == pytest.approx(0.598139, abs=1e-6)


def test_sigmoid_with_label_smoothing_is_cdpo():
    expected = -(0.9 * log_sigmoid(0.2)) - 0.1 * log_sigmoid(-0.2)  # 0.9*0.598139 + 0.1*0.798139
    assert expected == pytest.approx(0.618139, abs=1e-6)
    assert value("sigmoid", beta=0.1, label_smoothing=0.1) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_cdpo_is_plain_dpo_and_robust_dpo_weighted(eps):
    """The identity tests/test_trl_parity.py checks cDPO with (TRL's sigmoid has no label
    smoothing): since -log sigmoid(-z) = -log sigmoid(z) + z, both are DPO plus a multiple of beta h,
    and cDPO_eps = (2 - 2 eps) DPO - (1 - 2 eps) rDPO_eps."""
    combined = (2 - 2 * eps) * value("sigmoid", beta=0.1) - (1 - 2 * eps) * value("robust", beta=0.1,
                                                                                  label_smoothing=eps)
    assert value("sigmoid", beta=0.1, label_smoothing=eps) == pytest.approx(combined, abs=1e-12)
    assert value("sigmoid", beta=0.1, label_smoothing=eps) == pytest.approx(0.598139 + eps * 0.2, abs=1e-6)


def test_robust():
    # ((1-e) * -logsig(0.2) + e * logsig(-0.2)) / (1 - 2e) = (0.9*0.598139 - 0.1*0.798139)/0.8
    expected = (0.9 * 0.5981388693 - 0.1 * 0.7981388693) / 0.8
    assert value("robust", beta=0.1, label_smoothing=0.1) == pytest.approx(expected, abs=1e-9)


def test_ipo_length_normalised_and_summed():
    # normalised: h = 1/4 - (-1)/2 = 0.75; (0.75 - 1/(2*0.1))^2 = (0.75 - 5)^2 = 18.0625
    assert value("ipo", beta=0.1) == pytest.approx(18.0625, abs=1e-12)
    # summed: h = 2; (2 - 5)^2 = 9
    assert value("ipo", beta=0.1, ipo_length_normalize=False) == pytest.approx(9.0, abs=1e-12)


def test_hinge():
    assert value("hinge", beta=0.1) == pytest.approx(0.8, abs=1e-12)  # max(0, 1 - 0.2)
    assert value("hinge", beta=1.0) == pytest.approx(0.0, abs=1e-12)  # max(0, 1 - 2)


def test_sigmoid_norm():
    # h_norm = 0.75 (as for IPO); -log sigmoid(0.1 * 0.75) = log(1 + e^-0.075) = 0.656406
    assert value("sigmoid_norm", beta=0.1) == pytest.approx(math.log1p(math.exp(-0.075)), abs=1e-12)


def test_simpo_ignores_the_reference():
    # avg chosen -10/4 = -2.5, avg rejected -12/2 = -6; beta 2: 2 * 3.5 - 0.5 = 6.5
    expected = math.log1p(math.exp(-6.5))
    assert value("simpo", beta=2.0, simpo_gamma=0.5) == pytest.approx(expected, abs=1e-12)
    assert value("simpo", pair(rc=0.0, rr=-50.0), beta=2.0, simpo_gamma=0.5) == pytest.approx(expected, abs=1e-12)


def test_rdpo_is_park_eq9_with_the_length_gap_added():
    # Park et al. 2024, eq. 9: -log sigmoid(beta h + alpha (|y_w| - |y_l|)) = -log sigmoid(0.2 + 0.05 * 2)
    assert value("rdpo", beta=0.1, rdpo_alpha=0.05) == pytest.approx(math.log1p(math.exp(-0.3)), abs=1e-12)
    # the chosen shorter by 2 tokens: 0.2 - 0.1
    swapped = pair(lc=2, lr=4)
    assert value("rdpo", swapped, beta=0.1, rdpo_alpha=0.05) == pytest.approx(math.log1p(math.exp(-0.1)), abs=1e-12)


def test_rdpo_pulls_less_on_pairs_won_by_the_longer_response():
    """R-DPO's point: a preference that length explains teaches the policy less. With the same
    log-ratios, the gradient on a pair whose chosen response is the longer is smaller than on one
    whose chosen response is the shorter (DPO's gradients on the two are equal)."""
    def grad(lc, lr, name="rdpo"):
        logps = pair(lc=lc, lr=lr)
        logps.policy_chosen_logps.requires_grad_(True)
        LOSSES[name](logps, LossConfig(type=name, beta=0.1, **({"rdpo_alpha": 0.05} if name == "rdpo" else {}))).backward()
        return -logps.policy_chosen_logps.grad.item()  # how hard the loss pushes log pi(y_w) up

    assert grad(lc=10, lr=2) < grad(lc=2, lr=10)
    assert grad(lc=10, lr=2, name="sigmoid") == grad(lc=2, lr=10, name="sigmoid")


def test_sft_is_per_token_nll_of_chosen():
    assert value("sft") == pytest.approx(2.5, abs=1e-12)  # 10 / 4


def test_weighted_combination_is_rpo():
    cfg = LossConfig(type=["sigmoid", "sft"], weights=[1.0, 0.5], beta=0.1)
    expected = math.log1p(math.exp(-0.2)) + 0.5 * 2.5
    assert preference_loss(pair(), cfg).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", ["sigmoid", "robust", "sigmoid_norm", "rdpo"])
def test_sigmoid_family_is_ln2_at_initialisation(name):
    same = pair(pc=-7.0, pr=-9.0, rc=-7.0, rr=-9.0, lc=3, lr=3)  # policy == reference
    assert value(name, same, beta=0.5) == pytest.approx(math.log(2), abs=1e-12)


def test_implicit_rewards():
    chosen, rejected = implicit_rewards(pair(), beta=0.1)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.1)


def test_unknown_loss_and_weight_mismatch_are_config_errors():
    with pytest.raises(ValueError, match="unknown loss"):
        LossConfig(type="dpoo")
    with pytest.raises(ValueError, match="weights"):
        LossConfig(type=["sigmoid", "sft"], weights=[1.0])


@pytest.mark.parametrize("types, setting", [
    ("ipo", {"label_smoothing": 0.1}),
    ("hinge", {"label_smoothing": 0.1}),
    ("sigmoid", {"simpo_gamma": 1.0}),
    (["sigmoid", "sft"], {"rdpo_alpha": 0.1}),
    ("simpo", {"ipo_length_normalize": False}),
])
def test_a_loss_setting_no_configured_loss_uses_is_refused_in_one_sentence(types, setting):
    (key, _), = setting.items()
    raw = {"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "loss": {"type": types, **setting}}
    with pytest.raises(UserError, match=rf"loss\.{key} is .* does not use it"):
        validate_config(raw)


def test_loss_settings_at_their_defaults_or_used_by_one_of_the_types_are_accepted():
    # A run's config.yaml lists every key at its value: defaults of unused settings must pass.
    LossConfig(type="sigmoid", label_smoothing=0.0, ipo_length_normalize=True, simpo_gamma=0.5, rdpo_alpha=0.01)
    LossConfig(type=["ipo", "robust"], label_smoothing=0.1, ipo_length_normalize=False)
    LossConfig(type=["simpo", "rdpo"], simpo_gamma=1.0, rdpo_alpha=0.1)


@pytest.mark.parametrize("model", [{"reference_path": "other"}, {"reference": "precompute"}])
def test_reference_settings_with_reference_free_are_refused(model):
    """loss.reference_free loads no reference: a reference model or a precomputed cache asked
    for beside it would silently do nothing."""
    raw = {"model": {"path": "m", **model}, "data": {"train": "d.jsonl"},
           "loss": {"type": "sigmoid", "reference_free": True}}
    with pytest.raises(UserError, match="loss.reference_free is true, so no reference is loaded"):
        validate_config(raw)
    raw["loss"]["reference_free"] = False
    validate_config(raw)


def softplus(x):  # -log sigmoid(-x), exact in float64 for any x
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def sigmoid(x):
    return math.exp(-softplus(-x))


@pytest.mark.parametrize("z", [1000.0, -1000.0, 0.0])
@pytest.mark.parametrize("name, eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1)])
def test_sigmoid_losses_and_gradients_are_exact_at_margins_of_1000_in_float32(name, eps, z):
    """-log sigmoid by logsigmoid, never log(sigmoid(.)) (which gives inf at beta h = -1000): the
    loss and its gradient at beta h = +-1000 are the closed forms, in float32. With eps > 0,
    cDPO = (1-eps) S(-z) + eps S(z) and rDPO = ((1-eps) S(-z) - eps S(z)) / (1-2eps), S = softplus."""
    beta = 0.5
    h = z / beta
    logps = PairLogps(*(torch.tensor([v], dtype=torch.float32) for v in (-50.0 + h, -50.0, 0.0, 0.0)),
                      torch.tensor([3]), torch.tensor([3]))
    logps.policy_chosen_logps.requires_grad_(True)
    loss = LOSSES[name](logps, LossConfig(type=name, beta=beta, label_smoothing=eps))
    loss.backward()
    scale = 1 / (1 - 2 * eps) if name == "robust" else 1.0
    sign = -1.0 if name == "robust" else 1.0
    expected = scale * ((1 - eps) * softplus(-z) + sign * eps * softplus(z))
    expected_grad = scale * beta * (-(1 - eps) * sigmoid(-z) + sign * eps * sigmoid(z))
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert logps.policy_chosen_logps.grad.item() == pytest.approx(expected_grad, rel=1e-6, abs=1e-7)


def test_ipo_in_float32_with_summed_log_probs_near_minus_5000():
    """Log-ratios of long responses are differences of large numbers; in float32 (ulp 5e-4 at
    5000) the margin and IPO's square stay exact to float32 precision."""
    logps = PairLogps(*(torch.tensor([v], dtype=torch.float32) for v in (-5000.25, -5003.5, -5001.0, -5002.0)),
                      torch.tensor([4000]), torch.tensor([4100]))
    h = 0.75 + 1.5
    assert LOSSES["ipo"](logps, LossConfig(type="ipo", beta=0.1, ipo_length_normalize=False)).item() == (h - 5) ** 2
    h_avg = 0.75 / 4000 + 1.5 / 4100
    assert LOSSES["ipo"](logps, LossConfig(type="ipo", beta=0.1)).item() == pytest.approx((h_avg - 5) ** 2, rel=1e-6)
