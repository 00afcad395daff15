"""Preference losses as pure functions of per-sequence log-probs.

Every loss takes a `PairLogps` (summed log-probs of the chosen and rejected completions under
the policy and the reference, plus completion lengths) and the `LossConfig`, and returns the
per-pair loss, shape (B,). Notation follows the DPO paper (Rafailov et al. 2023):

    logratio_chosen   = log pi(y_w|x) - log ref(y_w|x)
    logratio_rejected = log pi(y_l|x) - log ref(y_l|x)
    logratio_margin   = logratio_chosen - logratio_rejected       (h in several papers)

`LOSSES` maps each config name to its function; `preference_loss` combines several with weights
(DPO + SFT is RPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    policy_chosen_logps: torch.Tensor  # (B,) summed over completion tokens
    policy_rejected_logps: torch.Tensor  # (B,)
    reference_chosen_logps: torch.Tensor  # (B,) zeros when reference-free
    reference_rejected_logps: torch.Tensor  # (B,)
    chosen_lengths: torch.Tensor  # (B,) completion tokens counted in the sums
    rejected_lengths: torch.Tensor  # (B,)

    @property
    def logratio_chosen(self) -> torch.Tensor:
        return self.policy_chosen_logps - self.reference_chosen_logps

    @property
    def logratio_rejected(self) -> torch.Tensor:
        return self.policy_rejected_logps - self.reference_rejected_logps

    @property
    def logratio_margin(self) -> torch.Tensor:
        return self.logratio_chosen - self.logratio_rejected

    @property
    def length_normalized_margin(self) -> torch.Tensor:
        # Per-token average log-ratios; lengths are >= 1 for every kept pair.
        return (
            self.logratio_chosen / self.chosen_lengths.clamp(min=1)
            - self.logratio_rejected / self.rejected_lengths.clamp(min=1)
        )


def sigmoid_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """DPO, Rafailov et al. 2023, eq. 7: -log sigmoid(beta * h).

    With `label_smoothing` eps > 0 this is conservative DPO (cDPO, Mitchell 2023): the label is
    assumed flipped with probability eps, giving
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
    """
    z = cfg.beta * logps.logratio_margin
    eps = cfg.label_smoothing
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def robust_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """Robust DPO (rDPO), Chowdhury et al. 2024: the loss made unbiased under labels flipped with
    probability eps = `label_smoothing`,

    ((1 - eps) * L(y_w, y_l) - eps * L(y_l, y_w)) / (1 - 2 eps),  L(a, b) = -log sigmoid(beta h_ab),
    = ((1 - eps) * -log sigmoid(beta h) + eps * log sigmoid(-beta h)) / (1 - 2 eps).

    Unlike cDPO it is not bounded below: for beta h >> 0 it falls like -eps beta h / (1 - 2 eps).
    """
    z = cfg.beta * logps.logratio_margin
    eps = cfg.label_smoothing
    return ((1 - eps) * -F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def ipo_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """IPO, Azar et al. 2023, eq. 17: (h - 1 / (2 tau))^2 with tau = beta.

    The paper's h is a sequence-level log-ratio; summed over tokens it grows with length, so by
    default h uses per-token averages (the normalisation the IPO authors used in practice).
    """
    h = logps.length_normalized_margin if cfg.ipo_length_normalize else logps.logratio_margin
    return (h - 1 / (2 * cfg.beta)) ** 2


def hinge_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """max(0, 1 - beta h): SLiC-HF's rank calibration loss (Zhao et al. 2023),
    max(0, delta - log pi(y_w|x) + log pi(y_l|x)), in the form TRL and RSO (Liu et al. 2024) use:
    log-ratios against the reference in place of log-probs, margin delta = 1/beta, the whole
    scaled by beta (= beta * max(0, 1/beta - h)). SLiC-HF's regularisation term (the NLL of a
    target sequence) is not included; `[hinge, sft]` with weights adds the chosen response's.
    """
    return torch.relu(1 - cfg.beta * logps.logratio_margin)


def sigmoid_norm_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """Length-normalised DPO: eq. 7 of the DPO paper with per-token average log-ratios."""
    return -F.logsigmoid(cfg.beta * logps.length_normalized_margin)


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


def sft_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """Negative log-likelihood of the chosen completion per token (the NLL term of RPO,
    Pang et al. 2024, eq. 3, which adds it to DPO)."""
    return -logps.policy_chosen_logps / logps.chosen_lengths.clamp(min=1)


LOSSES = {
    "sigmoid": sigmoid_loss,
    "robust": robust_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "sigmoid_norm": sigmoid_norm_loss,
    "simpo": simpo_loss,
    "rdpo": rdpo_loss,
    "sft": sft_loss,
}

# Losses that never look at the reference model.
REFERENCE_FREE = {"simpo", "sft"}

# The loss types each parameter enters; with none of them configured, it changes nothing, and
# the config refuses a value other than its default (a setting that silently does nothing costs
# a whole run, as a typo does).
PARAMETER_USERS = {
    "label_smoothing": ("sigmoid", "robust"),
    "ipo_length_normalize": ("ipo",),
    "simpo_gamma": ("simpo",),
    "rdpo_alpha": ("rdpo",),
}


def preference_loss(logps: PairLogps, cfg) -> torch.Tensor:
    """Weighted sum of the configured losses, per pair: (B,)."""
    total = torch.zeros_like(logps.policy_chosen_logps)
    for name, weight in zip(cfg.types, cfg.type_weights):
        total = total + weight * LOSSES[name](logps, cfg)
    return total


def implicit_rewards(logps: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """beta * log(pi/ref) of chosen and rejected, summed log-probs: the DPO paper's implicit
    reward (sec. 5), whatever the loss (TRL's `rewards/*`); beta * log pi when the reference
    log-probs are zeros (reference-free). Not what `ipo`, `sigmoid_norm` or `simpo` push, which
    use per-token averages."""
    return beta * logps.logratio_chosen.detach(), beta * logps.logratio_rejected.detach()
