"""The loss types by name, and which of them each setting concerns: what the config checks.

Kept apart from `preftune.losses` (which builds `LOSSES` from these names) so that validating a
config, `preftune config show` and `--help` do not import torch.
"""

from __future__ import annotations

# Every loss type a config may name; `preftune.losses` maps each NAME to its function NAME_loss.
LOSS_NAMES = ("sigmoid", "robust", "ipo", "hinge", "sigmoid_norm", "simpo", "rdpo", "bco_pair", "sft",
              "exo_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down", "discopop", "aot", "aot_unpaired")

# The losses built on a chosen-minus-rejected difference of rewards, where f-DPO's per-prompt
# constant cancels; `sft` does not read the reference, so it may sit beside them.
F_DIVERGENCE_LOSSES = ("sigmoid", "robust", "ipo", "hinge", "sigmoid_norm", "exo_pair", "discopop")

# Losses that sort across the batch: not sums of per-pair terms, so gradient accumulation and
# several processes would change them (the config and `train` refuse both).
BATCH_WIDE = {"aot", "aot_unpaired"}

# Losses that also read BCO's reward shift, a running mean the training loop keeps.
TAKE_REWARD_SHIFT = {"bco_pair"}

# Losses that never look at the reference model.
REFERENCE_FREE = {"simpo", "sft"}

# The loss types each parameter enters; with none of them configured, it changes nothing, and
# the config refuses a value other than its default (a setting that silently does nothing costs
# a whole run, as a typo does).
PARAMETER_USERS = {
    "label_smoothing": ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"),
    "ipo_length_normalize": ("ipo",),
    "simpo_gamma": ("simpo",),
    "rdpo_alpha": ("rdpo",),
    "discopop_tau": ("discopop",),
    "f_divergence_type": F_DIVERGENCE_LOSSES,
    "f_alpha_divergence_coef": F_DIVERGENCE_LOSSES,
    "bco_reward_shift": ("bco_pair",),
}
