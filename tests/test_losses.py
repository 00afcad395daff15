"""Every loss against numbers worked out by hand in the test.

One pair with policy chosen/rejected log-probs -10 / -12, reference -11 / -11, so
logratio_chosen = 1, logratio_rejected = -1, logratio_margin h = 2; lengths 4 and 2.
"""

import math

import pytest
import torch

from preftune.config import LossConfig, validate_config
from preftune.errors import UserError
from preftune.losses import (
    BATCH_WIDE,
    F_DIVERGENCE_LOSSES,
    LOSSES,
    PairLogps,
    implicit_rewards,
    preference_loss,
)


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


# ------------------------------------------------------------------ the losses TRL 1.16 also has
# The same pair as above unless said: logratio_chosen a_w = 1, logratio_rejected a_l = -1, h = 2.


def test_exo_pair_is_the_kl_from_the_policys_preference_to_the_smoothed_label():
    # q = (sigmoid(0.2), sigmoid(-0.2)) = (0.549834, 0.450166), p = (0.9, 0.1):
    # 0.549834 (-0.598139 + 0.105361) + 0.450166 (-0.798139 + 2.302585) = -0.270946 + 0.677250
    expected = sigmoid(0.2) * (log_sigmoid(0.2) - math.log(0.9)) + sigmoid(-0.2) * (log_sigmoid(-0.2) - math.log(0.1))
    assert expected == pytest.approx(0.406304, abs=1e-6)
    assert value("exo_pair", beta=0.1, label_smoothing=0.1) == pytest.approx(expected, abs=1e-12)
    # zero where the policy's preference is the label's: beta h = log(0.9 / 0.1), beta = log(9) / 2
    assert value("exo_pair", beta=math.log(9) / 2, label_smoothing=0.1) == pytest.approx(0.0, abs=1e-12)


def test_nca_pair_judges_each_reward_alone():
    # r_w = 0.1, r_l = -0.1: -log sig(0.1) - 1/2 log sig(-0.1) - 1/2 log sig(0.1)
    # = 0.644397 + 0.372199 + 0.322199
    assert value("nca_pair", beta=0.1) == pytest.approx(1.338793, abs=1e-6)
    assert value("nca_pair", beta=0.1) == pytest.approx(1.5 * softplus(-0.1) + 0.5 * softplus(0.1), abs=1e-12)


def test_sppo_hard_pulls_the_log_ratios_to_plus_and_minus_one_over_two_beta():
    assert value("sppo_hard", beta=0.1) == pytest.approx(32.0, abs=1e-12)  # (1 - 5)^2 + (-1 + 5)^2
    assert value("sppo_hard", beta=0.5) == pytest.approx(0.0, abs=1e-12)  # targets +-1: reached


def test_apo_zero_and_apo_down():
    # zero: 1 - sig(0.1) + sig(-0.1) = 2 sig(-0.1) = 0.950042
    assert value("apo_zero", beta=0.1) == pytest.approx(2 * sigmoid(-0.1), abs=1e-12)
    assert value("apo_zero", beta=0.1) == pytest.approx(0.950042, abs=1e-6)
    # down: sig(0.1) + 1 - sig(0.2) = 0.524979 + 0.450166
    assert value("apo_down", beta=0.1) == pytest.approx(0.975145, abs=1e-6)
    assert value("apo_down", beta=0.1) == pytest.approx(sigmoid(0.1) + 1 - sigmoid(0.2), abs=1e-12)


def test_discopop_blends_the_logistic_and_exponential_losses():
    # z = 0.2, z / tau = 4, sig(4) = 0.982014: 0.017986 * 0.598139 + 0.982014 * e^-0.2 (0.818731)
    expected = (1 - sigmoid(4)) * softplus(-0.2) + sigmoid(4) * math.exp(-0.2)
    assert expected == pytest.approx(0.814763, abs=1e-6)
    assert value("discopop", beta=0.1) == pytest.approx(expected, abs=1e-12)
    assert value("discopop", beta=0.1, discopop_tau=1.0) == pytest.approx(
        (1 - sigmoid(0.2)) * softplus(-0.2) + sigmoid(0.2) * math.exp(-0.2), abs=1e-12)


def two_pairs():
    """Pair A: policy -10 / -12, reference -13 / -11; pair B: policy -8 / -7, reference -10 / -12.
    Log-ratios: A 3 / -1 (h = 4), B 2 / 5 (h = -3). Policy margins log pi(y_w) - log pi(y_l):
    A 2, B -1; reference margins: A -2, B 2."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return PairLogps(t(-10, -8), t(-12, -7), t(-13, -10), t(-11, -12), torch.tensor([4, 4]), torch.tensor([2, 2]))


def test_aot_sorts_policy_and_reference_margins_across_the_batch():
    # sorted policy margins (-1, 2), sorted reference margins (-2, 2): differences (1, 0), so
    # beta 1 gives (-log sig(1), -log sig(0)) = (0.313262, 0.693147), where per-pair DPO has
    # (-log sig(4), -log sig(-3)) = (0.018150, 3.048587).
    losses = LOSSES["aot"](two_pairs(), LossConfig(type="aot", beta=1.0))
    assert losses.tolist() == pytest.approx([softplus(-1), math.log(2)], abs=1e-12)
    assert losses.tolist() == pytest.approx([0.313262, 0.693147], abs=1e-6)
    smoothed = LOSSES["aot"](two_pairs(), LossConfig(type="aot", beta=1.0, label_smoothing=0.1))
    assert smoothed[0].item() == pytest.approx(0.9 * softplus(-1) + 0.1 * softplus(1), abs=1e-12)


def test_aot_unpaired_sorts_chosen_and_rejected_log_ratios_apart():
    # sorted chosen (2, 3), sorted rejected (-1, 5): differences (3, -2) -> (0.048587, 2.126928)
    losses = LOSSES["aot_unpaired"](two_pairs(), LossConfig(type="aot_unpaired", beta=1.0))
    assert losses.tolist() == pytest.approx([softplus(-3), softplus(2)], abs=1e-12)
    assert losses.tolist() == pytest.approx([0.048587, 2.126928], abs=1e-6)


def test_every_loss_but_aot_is_a_sum_over_pairs():
    """Two pairs scored together give each pair's loss alone: micro-batches of any size sum to
    the same step. aot sorts across its batch, so it does not (and the config keeps its batch whole)."""
    both = two_pairs()
    both.pair_weights = torch.tensor([0.5, 2.0], dtype=both.policy_chosen_logps.dtype)  # WPO's, per pair too
    def pair(i):  # every per-pair field cut to pair i; an unset option (None) stays unset
        return PairLogps(*(None if (v := getattr(both, f)) is None else v[i:i + 1] for f in both.__dataclass_fields__))

    alone = [pair(i) for i in range(2)]
    for name in LOSSES:
        cfg = LossConfig(type=name, beta=1.0, label_smoothing=0.1 if name == "exo_pair" else 0.0)
        together = preference_loss(both, cfg)
        apart = torch.cat([preference_loss(one, cfg) for one in alone])
        if name in BATCH_WIDE:
            assert not torch.allclose(together.sum(), apart.sum()), name
        else:
            torch.testing.assert_close(together, apart, atol=1e-12, rtol=0, msg=name)


# f-DPO, Wang et al. 2023: a_w = 1, a_l = -1, so u_w = e, u_l = 1/e.
@pytest.mark.parametrize("divergence, coef, margin", [
    ("forward_kl", 0.5, (1 - math.exp(-1)) - (1 - math.exp(1))),  # 1 - 1/u: 0.632121 + 1.718282 = 2.350402
    ("js_divergence", 0.5, 1.0),  # log(2e/(1+e)) - log((2/e)/(1+1/e)) = log e
    ("alpha_divergence", 0.5, 2 * (1 - math.exp(-0.5)) - 2 * (1 - math.exp(0.5))),  # (1 - u^-1/2)/(1/2): 4 sinh(1/2)
    ("alpha_divergence", 0.0, 2 * math.sinh(1)),  # coefficient 0 is forward KL
    ("alpha_divergence", 1.0, 2.0),  # coefficient 1 is reverse KL, DPO
])
def test_f_divergences_replace_the_log_ratio_by_f_prime(divergence, coef, margin):
    cfg = {"beta": 0.1, "f_divergence_type": divergence, "f_alpha_divergence_coef": coef}
    assert value("sigmoid", **cfg) == pytest.approx(softplus(-0.1 * margin), abs=1e-12)
    assert value("hinge", **cfg) == pytest.approx(max(0.0, 1 - 0.1 * margin), abs=1e-12)
    assert value("exo_pair", label_smoothing=0.1, **cfg) == pytest.approx(
        sigmoid(0.1 * margin) * (log_sigmoid(0.1 * margin) - math.log(0.9))
        + sigmoid(-0.1 * margin) * (log_sigmoid(-0.1 * margin) - math.log(0.1)), abs=1e-12)


def test_f_divergences_in_the_per_token_averages():
    # forward KL scores 0.632121 / 4 - (-1.718282) / 2 = 1.017171
    h_avg = (1 - math.exp(-1)) / 4 - (1 - math.exp(1)) / 2
    cfg = {"beta": 0.1, "f_divergence_type": "forward_kl"}
    assert value("sigmoid_norm", **cfg) == pytest.approx(softplus(-0.1 * h_avg), abs=1e-12)
    assert value("ipo", **cfg) == pytest.approx((h_avg - 5) ** 2, abs=1e-12)


@pytest.mark.parametrize("name, cfg, expected", [
    ("exo_pair", {"label_smoothing": 0.1}, 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)),  # q = (1/2, 1/2)
    ("nca_pair", {}, 2 * math.log(2)),  # log 2 + log 2 / 2 + log 2 / 2
    ("sppo_hard", {}, 2.0),  # (0 - 1)^2 + (0 + 1)^2 at beta 0.5
    ("apo_zero", {}, 1.0),  # 1 - 1/2 + 1/2
    ("apo_down", {}, 1.0),  # 1/2 + 1 - 1/2
    ("discopop", {}, (math.log(2) + 1) / 2),  # z = 0: half logistic (log 2), half exponential (1)
    ("aot", {}, math.log(2)),  # equal sorted margins
    ("aot_unpaired", {}, math.log(2)),  # every log-ratio 0
    ("sigmoid", {"f_divergence_type": "forward_kl"}, math.log(2)),  # f'(1) - f'(1) = 0
    ("robust", {"f_divergence_type": "js_divergence", "label_smoothing": 0.1}, math.log(2)),
    ("sigmoid_norm", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}, math.log(2)),
])
def test_value_at_initialisation(name, cfg, expected):
    """policy == reference: every log-ratio is 0 (two pairs, so aot has something to sort)."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    same = PairLogps(t(-7, -3), t(-9, -8), t(-7, -3), t(-9, -8), torch.tensor([3, 5]), torch.tensor([3, 2]))
    losses = LOSSES[name](same, LossConfig(type=name, beta=0.5, **cfg))
    assert losses.tolist() == pytest.approx([expected] * 2, abs=1e-12)


# beta = 0.5 and log-ratios of +-2000: beta times each log-ratio is +-1000. Closed forms: sig(1000) = 1.
LARGE = {  # name: ((loss, d loss / d log pi(y_w)) with chosen up, (the same) with chosen down)
    "exo_pair": ((-math.log(0.9), 0.0), (-math.log(0.1), 0.0)),
    "nca_pair": ((500.0, 0.25), (1500.0, -0.5)),  # -1/2 log sig(-1000) = 500; gradient beta (-sig(-r_w) + sig(r_w)/2)
    "sppo_hard": ((2 * 1999.0 ** 2, 2 * 1999.0), (2 * 2001.0 ** 2, -2 * 2001.0)),
    "apo_zero": ((0.0, 0.0), (2.0, 0.0)),
    "apo_down": ((1.0, 0.0), (1.0, 0.0)),
    "discopop": ((0.0, 0.0), (2000.0, -0.5)),  # z = -2000: the logistic part, -log sig(z) = 2000
    "aot": ((0.0, 0.0), (2000.0, -0.5)),  # one pair: DPO at beta h = +-2000
    "aot_unpaired": ((0.0, 0.0), (2000.0, -0.5)),
}


@pytest.mark.parametrize("chosen_up", [True, False])
@pytest.mark.parametrize("name", list(LARGE))
def test_new_losses_and_gradients_are_exact_at_log_ratios_of_2000_in_float32(name, chosen_up):
    x = 2000.0 if chosen_up else -2000.0
    logps = PairLogps(*(torch.tensor([v], dtype=torch.float32) for v in (x, -x, 0.0, 0.0)),
                      torch.tensor([3]), torch.tensor([3]))
    logps.policy_chosen_logps.requires_grad_(True)
    loss = LOSSES[name](logps, LossConfig(type=name, beta=0.5, label_smoothing=0.1 if name == "exo_pair" else 0.0))
    loss.backward()
    expected, expected_grad = LARGE[name][0 if chosen_up else 1]
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert logps.policy_chosen_logps.grad.item() == pytest.approx(expected_grad, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("chosen_up", [True, False])
@pytest.mark.parametrize("name", F_DIVERGENCE_LOSSES)
@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_losses_stay_finite_at_log_ratios_of_2000_in_float32(divergence, name, chosen_up):
    """1/u = exp(2000) is inf in float32: the exponent is capped, so losses and gradients stay
    finite (IPO's square included), and the pair the policy already gets right costs nothing."""
    x = 2000.0 if chosen_up else -2000.0
    logps = PairLogps(*(torch.tensor([v], dtype=torch.float32) for v in (x, -x, 0.0, 0.0)),
                      torch.tensor([3]), torch.tensor([3]))
    logps.policy_chosen_logps.requires_grad_(True)
    logps.policy_rejected_logps.requires_grad_(True)
    cfg = LossConfig(type=name, beta=0.5, f_divergence_type=divergence,
                     label_smoothing=0.1 if name in ("exo_pair", "robust") else 0.0)
    loss = LOSSES[name](logps, cfg)
    loss.backward()
    assert math.isfinite(loss.item())
    assert math.isfinite(logps.policy_chosen_logps.grad.item())
    assert math.isfinite(logps.policy_rejected_logps.grad.item())
    if chosen_up and name in ("sigmoid", "sigmoid_norm", "hinge", "discopop"):
        assert loss.item() == 0.0
    if divergence == "js_divergence" and name == "sigmoid":  # log(2u/(1+u)): margin +-2000 exactly
        assert loss.item() == pytest.approx(softplus(-1000.0 if chosen_up else 1000.0), rel=1e-6)


# ------------------------------------------------------------------ their settings


def config_with(loss, **train):
    return {"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "loss": loss, "train": train}


@pytest.mark.parametrize("loss, match", [
    ({"type": "exo_pair"}, r"exo_pair needs loss\.label_smoothing above 0"),
    ({"type": "nca_pair", "f_divergence_type": "forward_kl"}, r"loss\.f_divergence_type is .* does not use it"),
    ({"type": ["sigmoid", "nca_pair"], "f_divergence_type": "forward_kl"},
     r"f_divergence_type forward_kl is defined only for .* not for nca_pair"),
    ({"type": ["sigmoid", "aot"], "f_divergence_type": "js_divergence"}, r"not for aot"),
    ({"type": "sigmoid", "f_divergence_type": "forward_kl", "f_alpha_divergence_coef": 0.3},
     r"f_alpha_divergence_coef is 0.3, but loss\.f_divergence_type is forward_kl"),
    ({"type": "sigmoid", "f_divergence_type": "forward_kl", "reference_free": True}, r"reference_free: true has none"),
    ({"type": "sigmoid", "discopop_tau": 0.1}, r"loss\.discopop_tau is .* does not use it"),
    ({"type": "apo_zero", "label_smoothing": 0.1}, r"loss\.label_smoothing is .* does not use it"),
])
def test_new_loss_settings_refused_in_one_sentence(loss, match):
    with pytest.raises(UserError, match=match):
        validate_config(config_with(loss))


def test_new_loss_settings_accepted_where_used():
    LossConfig(type=["sigmoid", "sft"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)
    LossConfig(type=["ipo", "discopop"], f_divergence_type="js_divergence", discopop_tau=0.1)
    LossConfig(type="exo_pair", label_smoothing=1e-3)
    LossConfig(type="aot_unpaired", label_smoothing=0.1)
    # defaults of unused settings pass: a run's config.yaml lists every key
    LossConfig(type="nca_pair", f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05)


@pytest.mark.parametrize("train, match", [
    ({"batch_size": 4, "grad_accum": 2}, r"train\.grad_accum: 2 would sort 2 micro-batches of 4 pairs apart, "
                                         r"not the step's 8 together; set train\.grad_accum: 1 and train\.batch_size: 8"),
    ({"batch_size": 1}, r"train\.batch_size: 1 leaves one pair to sort"),
    ({"batch_size": 4, "eval_batch_size": 1}, r"train\.eval_batch_size: 1 leaves one pair to sort"),
])
@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_aot_keeps_its_sort_in_one_micro_batch(name, train, match):
    with pytest.raises(UserError, match=rf"loss\.type {name} sorts margins across .*{match}"):
        validate_config(config_with({"type": name}, **train))
    validate_config(config_with({"type": name}, batch_size=8, grad_accum=1))
    validate_config(config_with({"type": "sigmoid"}, **train))  # per-pair losses accumulate exactly


@pytest.mark.parametrize("run_type, loss", [("aot", None), ("sigmoid", "aot_unpaired")])
def test_eval_pairs_names_its_own_batch_size_option_for_a_sort_over_one_pair(run_type, loss):
    from preftune.evaluate import pairs_eval_config

    run = {"model": {"path": "m"}, "loss": {"type": run_type}}
    with pytest.raises(UserError, match=r"--batch-size 1 leaves one pair to sort, which is plain DPO; "
                                        r"pass --batch-size 2 or more"):
        pairs_eval_config("m", "d.jsonl", run, None, loss, 1, None, "float32")
    assert pairs_eval_config("m", "d.jsonl", run, None, loss, 2, None, "float32").train.eval_batch_size == 2
