"""Preference losses as pure functions of per-sequence log-probs.

Every loss takes a `PairLogps` (summed log-probs of the chosen and rejected completions under
the policy and the reference, plus completion lengths) and the `LossConfig`, and returns the
per-pair loss, shape (B,). Notation follows the DPO paper (Rafailov et al. 2023):

    logratio_chosen   = log pi(y_w|x) - log ref(y_w|x)
    logratio_rejected = log pi(y_l|x) - log ref(y_l|x)
    logratio_margin   = logratio_chosen - logratio_rejected       (h in several papers)

`LOSSES` maps each config name to its function; `preference_loss` combines several with weights
(DPO + SFT is RPO).

Every loss is per pair except `aot` and `aot_unpaired`, which sort margins across the batch they
are given: their i-th entry belongs to the i-th order statistic, not to pair i, and their value
depends on which pairs share the batch (`BATCH_WIDE`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from preftune.loss_names import (  # noqa: F401  (the rest re-exported for train and evaluate)
    BATCH_WIDE,
    F_DIVERGENCE_LOSSES,
    LOSS_NAMES,
    PARAMETER_USERS,
    REFERENCE_FREE,
    TAKE_REWARD_SHIFT,
)


@dataclass
class PairLogps:
    policy_chosen_logps: torch.Tensor  # (B,) summed over completion tokens
    policy_rejected_logps: torch.Tensor  # (B,)
    reference_chosen_logps: torch.Tensor  # (B,) zeros when reference-free
    reference_rejected_logps: torch.Tensor  # (B,)
    chosen_lengths: torch.Tensor  # (B,) completion tokens counted in the sums
    rejected_lengths: torch.Tensor  # (B,)
    # WPO (loss.wpo_weighting): w(y_w) * w(y_l) of each pair, no gradient; None: unweighted.
    pair_weights: torch.Tensor | None = None  # (B,)
    # train.token_metrics: the policy's token statistics (token_stats.py) summed per sequence,
    # chosen sequences first, no gradient; read by metrics.py only.
    token_stat_sums: dict[str, torch.Tensor] | None = None  # {name: (2B,)}

    @property
    def logratio_chosen(self) -> torch.Tensor:
        return self.policy_chosen_logps - self.reference_chosen_logps

    @property
    def logratio_rejected(self) -> torch.Tensor:
        return self.policy_rejected_logps - self.reference_rejected_logps

    @property
    def logratio_margin(self) -> torch.Tensor:
        return self.logratio_chosen - self.logratio_rejected


# ------------------------------------------------------------------ f-divergences (f-DPO)

def f_divergence_score(logratio: torch.Tensor, cfg) -> torch.Tensor:
    """f'(pi/ref) of f-DPO (Wang et al. 2023, "Beyond Reverse KL", Theorem 1 and Table 1), taken
    at u = pi(y|x)/ref(y|x) = exp(logratio): under an f-divergence constraint the optimal policy
    implies the reward r(x, y) = beta f'(u) + const(x), so DPO's log-ratio becomes f'(u). Constants
    are dropped so that every score is 0 at u = 1 (they cancel in chosen minus rejected):

        reverse_kl        f(u) = u log u                          score log u (DPO)
        forward_kl        f(u) = -log u                           score 1 - 1/u
        js_divergence     f(u) = u log u - (u+1) log((u+1)/2)     score log(2u / (1 + u))
        alpha_divergence  f(u) = (u^(1-a) - (1-a) u - a) / (a (a-1))   score (1 - u^-a) / a

    a being the paper's alpha. `f_alpha_divergence_coef` keeps TRL's meaning, which is 1 - a:
    0 is forward KL (a = 1), 1 reverse KL (the limit a -> 0), and at 0.5 (the default) both
    readings agree.

    1/u grows as exp(-logratio) (a rejected response's log-ratio of -100 is common late in a
    run): the exponent is capped at 0.45 x the log of the dtype's largest number (39.9 in float32,
    5 in float16), so that a score, and IPO's square of a margin of scores, stay finite. Past the
    cap a score stops moving (zero gradient).
    """
    kind = cfg.f_divergence_type
    if kind == "reverse_kl" or (kind == "alpha_divergence" and cfg.f_alpha_divergence_coef == 1.0):
        return logratio
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)  # log(2u/(1+u)), finite for any log-ratio
    a = 1.0 if kind == "forward_kl" else 1.0 - cfg.f_alpha_divergence_coef
    cap = 0.45 * math.log(torch.finfo(logratio.dtype).max)
    return -torch.expm1((-a * logratio).clamp(max=cap)) / a


def _scores(logps: PairLogps, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    return f_divergence_score(logps.logratio_chosen, cfg), f_divergence_score(logps.logratio_rejected, cfg)


def score_margin(logps: PairLogps, cfg) -> torch.Tensor:
    """h under the configured divergence: f'(u_w) - f'(u_l); the log-ratio margin for reverse KL."""
    chosen, rejected = _scores(logps, cfg)
    return chosen - rejected  # (B,)


def length_normalized_score_margin(logps: PairLogps, cfg) -> torch.Tensor:
    """h_avg: each response's score divided by its length (per-token average log-ratios for
    reverse KL; TRL's convention for the other divergences)."""
    chosen, rejected = _scores(logps, cfg)
    # Lengths are >= 1 for every kept pair; the clamp only guards a division by zero.
    return chosen / logps.chosen_lengths.clamp(min=1) - rejected / logps.rejected_lengths.clamp(min=1)


# ------------------------------------------------------------------ losses


def _smoothed_logistic(z: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): logsigmoid, exact at |z| = 1000."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def sigmoid_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """DPO, Rafailov et al. 2023, eq. 7: -log sigmoid(beta * h).

    With `label_smoothing` eps > 0 this is conservative DPO (cDPO, Mitchell 2023): the label is
    assumed flipped with probability eps, giving
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    """
    return _smoothed_logistic(cfg.beta * score_margin(logps, cfg), cfg.label_smoothing)


def robust_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """Robust DPO (rDPO), Chowdhury et al. 2024: the loss made unbiased under labels flipped with
    probability eps = `label_smoothing`,

    ((1 - eps) * L(y_w, y_l) - eps * L(y_l, y_w)) / (1 - 2 eps),  L(a, b) = -log sigmoid(beta h_ab),
    = ((1 - eps) * -log sigmoid(beta h) + eps * log sigmoid(-beta h)) / (1 - 2 eps).

    Unlike cDPO it is not bounded below: for beta h >> 0 it falls like -eps beta h / (1 - 2 eps).
    """
    z = cfg.beta * score_margin(logps, cfg)
    eps = cfg.label_smoothing
    return ((1 - eps) * -F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def ipo_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """IPO, Azar et al. 2023, eq. 17: (h - 1 / (2 tau))^2 with tau = beta.

    The paper's h is a sequence-level log-ratio; summed over tokens it grows with length, so by
    default h uses per-token averages (the normalisation the IPO authors used in practice).
    """
    h = length_normalized_score_margin(logps, cfg) if cfg.ipo_length_normalize else score_margin(logps, cfg)
    return (h - 1 / (2 * cfg.beta)) ** 2


def hinge_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """max(0, 1 - beta h): SLiC-HF's rank calibration loss (Zhao et al. 2023),
    max(0, delta - log pi(y_w|x) + log pi(y_l|x)), in the form TRL and RSO (Liu et al. 2024) use:
    log-ratios against the reference in place of log-probs, margin delta = 1/beta, the whole
    scaled by beta (= beta * max(0, 1/beta - h)). SLiC-HF's regularisation term (the NLL of a
    target sequence) is not included; `[hinge, sft]` with weights adds the chosen response's.
    """
    return torch.relu(1 - cfg.beta * score_margin(logps, cfg))


def sigmoid_norm_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """Length-normalised DPO: eq. 7 of the DPO paper with per-token average log-ratios."""
    return -F.logsigmoid(cfg.beta * length_normalized_score_margin(logps, cfg))


def simpo_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """SimPO, Meng et al. 2024, eq. 6: -log sigmoid(beta/|y_w| log pi(y_w|x)
    - beta/|y_l| log pi(y_l|x) - gamma). Reference-free by construction."""
    avg_chosen = logps.policy_chosen_logps / logps.chosen_lengths.clamp(min=1)
    avg_rejected = logps.policy_rejected_logps / logps.rejected_lengths.clamp(min=1)
    return -F.logsigmoid(cfg.beta * (avg_chosen - avg_rejected) - cfg.simpo_gamma)


def rdpo_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """R-DPO, Park et al. 2024, eq. 9: -log sigmoid(beta h + alpha (|y_w| - |y_l|)).

    The policy maximises r(x, y) - alpha |y| under the KL constraint, while the labels still
    follow r (length bias included), so r = beta log(pi/ref) + alpha |y| + const and the
    Bradley-Terry logit gains +alpha (|y_w| - |y_l|). The length term thus explains the part of
    a preference that length explains: a pair won by the longer response is already partly
    satisfied and pulls less, one won by the shorter response pulls more, and the implicit
    reward beta log(pi/ref) learns less of the length bias. |y| counts completion tokens (EOS
    included), as the sums do.
    """
    length_gap = (logps.chosen_lengths - logps.rejected_lengths).to(logps.logratio_margin.dtype)
    return -F.logsigmoid(cfg.beta * logps.logratio_margin + cfg.rdpo_alpha * length_gap)


def bco_pair_loss(logps: PairLogps, cfg, reward_shift: float = 0.0) -> torch.Tensor:
    """BCO, Jung et al. 2024 ("Binary Classifier Optimization for Large Language Model
    Alignment"), on pairs: a binary classifier whose logit is the implicit reward
    r = beta log pi/ref, shifted by delta, calls chosen responses good and rejected ones bad:
    -log sigmoid(r_w - delta) - log sigmoid(-(r_l - delta)).

    delta (`reward_shift`) is the paper's reward shift, the mean of the implicit rewards seen so
    far; the training loop keeps it (carried_state.next_reward_shift) and passes it in, a constant
    with no gradient. `loss.bco_reward_shift: none` passes 0, TRL 1.16's `bco_pair`.
    """
    beta = cfg.beta
    chosen_rewards = beta * logps.logratio_chosen  # (B,)
    rejected_rewards = beta * logps.logratio_rejected  # (B,)
    return -F.logsigmoid(chosen_rewards - reward_shift) - F.logsigmoid(reward_shift - rejected_rewards)


def sft_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """Negative log-likelihood of the chosen completion per token (the NLL term of RPO,
    Pang et al. 2024, eq. 3, which adds it to DPO)."""
    return -logps.policy_chosen_logps / logps.chosen_lengths.clamp(min=1)


def exo_pair_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """EXO, Ji et al. 2024, eq. 16 for two responses (EXO-pref): the reverse KL from the policy's
    preference to the label's, KL(q || p), where q = softmax(beta log(pi/ref)) over {y_w, y_l}
    = (sigmoid(beta h), sigmoid(-beta h)) and p = (1 - eps, eps), eps = `label_smoothing` (the
    paper uses 1e-3):

        sigmoid(beta h) (log sigmoid(beta h) - log(1 - eps)) + sigmoid(-beta h) (log sigmoid(-beta h) - log eps)

    It is 0 at beta h = log((1 - eps) / eps) (6.9 for eps = 1e-3) and grows on either side, so
    unlike DPO it stops pushing a pair past that margin. With eps = 0 the label is one-hot, the
    KL is infinite for every finite margin, and the config refuses it.
    """
    z = cfg.beta * score_margin(logps, cfg)
    eps = cfg.label_smoothing
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def nca_pair_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """NCA, Chen et al. 2024 (Noise Contrastive Alignment), its loss for pairwise preferences
    (K = 2 responses, the winner's label 1): with r = beta log(pi/ref) of each response,

        -log sigmoid(r_w) - 1/2 log sigmoid(-r_w) - 1/2 log sigmoid(-r_l)

    Each response's reward is judged on its own, not only their difference, so the chosen
    response's likelihood is not free to fall with the rejected one's (as it may under DPO).
    """
    chosen = cfg.beta * logps.logratio_chosen
    rejected = cfg.beta * logps.logratio_rejected
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def sppo_hard_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """SPPO, Wu et al. 2024, the squared loss of Algorithm 1's update (eq. 4.7),
    (log pi(y|x)/pi_t(y|x) - eta (P(y > pi_t | x) - 1/2))^2 summed over y_w and y_l, with hard
    probabilities (P = 1 for the chosen, 0 for the rejected), eta = 1/beta and the reference as
    pi_t (one self-play iteration):

        (log pi(y_w)/ref(y_w) - 1/(2 beta))^2 + (log pi(y_l)/ref(y_l) + 1/(2 beta))^2

    It pulls each implicit reward beta log(pi/ref) to +1/2 (chosen) and -1/2 (rejected). Summed
    log-probs, as in the paper. (The paper's soft P, from a preference model, is not this loss.)
    """
    target = 0.5 / cfg.beta
    return (logps.logratio_chosen - target) ** 2 + (logps.logratio_rejected + target) ** 2


def apo_zero_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """APO-zero, D'Oosterlinck et al. 2024, eq. 7, plus 1 so that it lies in [0, 2]:
    1 - sigmoid(beta log pi/ref(y_w)) + sigmoid(beta log pi/ref(y_l)). It raises the chosen
    response's likelihood and lowers the rejected one's, each anchored at the reference: for data
    whose chosen answers are better than the model's own."""
    return torch.sigmoid(-cfg.beta * logps.logratio_chosen) + torch.sigmoid(cfg.beta * logps.logratio_rejected)


def apo_down_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """APO-down, D'Oosterlinck et al. 2024, eq. 8, plus 1 so that it lies in [0, 2]:
    sigmoid(beta log pi/ref(y_w)) + 1 - sigmoid(beta h). It lowers both likelihoods, the rejected
    one's more: for data whose chosen answers are still worse than the model's own."""
    return torch.sigmoid(cfg.beta * logps.logratio_chosen) + torch.sigmoid(-cfg.beta * logps.logratio_margin)


def discopop_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """DiscoPOP (the log-ratio modulated loss, LRML), Chris Lu et al. 2024, eq. 5: with
    z = beta h and tau = `discopop_tau` (0.05 in the paper),

        (1 - sigmoid(z / tau)) (-log sigmoid(z)) + sigmoid(z / tau) exp(-z)

    DPO's logistic loss where the margin is negative, an exponential loss where it is positive.
    sigmoid(z/tau) exp(-z) is computed as exp(log sigmoid(z/tau) - z): at z = -1000, exp(-z) alone
    is inf and inf * 0 would be nan.
    """
    z = cfg.beta * score_margin(logps, cfg)
    tau = cfg.discopop_tau
    return torch.sigmoid(-z / tau) * -F.logsigmoid(z) + torch.exp(F.logsigmoid(z / tau) - z)


def aot_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport"): the policy's margins log pi(y_w) - log pi(y_l) should dominate the reference's
    margins in distribution (first-order stochastic dominance). In one dimension the optimal
    transport plan matches order statistics, so both are sorted over the batch and the logistic
    loss (cDPO's, with `label_smoothing`) is taken of beta times the difference of the i-th
    smallest of each. Entry i is the i-th order statistic's loss, not pair i's; with one pair it
    is DPO. The batch is the micro-batch (see README, "Losses").
    """
    policy = torch.sort(logps.policy_chosen_logps - logps.policy_rejected_logps).values  # (B,)
    reference = torch.sort(logps.reference_chosen_logps - logps.reference_rejected_logps).values  # (B,)
    return _smoothed_logistic(cfg.beta * (policy - reference), cfg.label_smoothing)


def aot_unpaired_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al. 2024): the chosen responses' log-ratios log pi/ref should
    dominate the rejected responses' in distribution, with no pairing between them; both are
    sorted over the batch and the i-th smallest of each compared as in `aot_loss`."""
    chosen = torch.sort(logps.logratio_chosen).values  # (B,)
    rejected = torch.sort(logps.logratio_rejected).values  # (B,)
    return _smoothed_logistic(cfg.beta * (chosen - rejected), cfg.label_smoothing)


# Each name's function is NAME_loss above; the names (and the sets of them the config checks)
# live in preftune.loss_names, which imports no torch.
LOSSES = {name: globals()[f"{name}_loss"] for name in LOSS_NAMES}


def preference_loss(logps: PairLogps, cfg, reward_shift: float = 0.0) -> torch.Tensor:
    """Weighted sum of the configured losses, per pair: (B,). `reward_shift` is BCO's delta,
    given to the losses in TAKE_REWARD_SHIFT.

    With WPO's pair weights (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
    Optimization", eq. 2) each pair's loss is multiplied by w(x, y_w) * w(x, y_l), the policy's own
    probability of producing the two responses (logprobs.wpo_weights), a constant: off-policy
    pairs the policy would never write count for less. (Not for BATCH_WIDE losses, whose entries
    are not pairs; the config refuses them.)"""
    total = torch.zeros_like(logps.policy_chosen_logps)
    for name, weight in zip(cfg.types, cfg.type_weights):
        extra = (reward_shift,) if name in TAKE_REWARD_SHIFT else ()
        total = total + weight * LOSSES[name](logps, cfg, *extra)
    if logps.pair_weights is not None:
        total = total * logps.pair_weights
    return total


def implicit_rewards(logps: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """beta * log(pi/ref) of chosen and rejected, summed log-probs: the DPO paper's implicit
    reward (sec. 5), whatever the loss (TRL's `rewards/*`); beta * log pi when the reference
    log-probs are zeros (reference-free). Not what `ipo`, `sigmoid_norm` or `simpo` push, which
    use per-token averages."""
    return beta * logps.logratio_chosen.detach(), beta * logps.logratio_rejected.detach()
