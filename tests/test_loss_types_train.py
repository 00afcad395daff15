"""Each loss type TRL 1.16 has beside DPO, and f-DPO's divergences, trained end to end for two
steps on the tiny model: config -> train -> metrics.jsonl. At the first step the policy is the
reference, so the loss is each loss's value at zero log-ratios (worked out in tests/test_losses.py)."""

import math
import types

import pytest
from preftune_test_data import make_config, read_metrics

from preftune.errors import UserError
from preftune.train import train

LN2 = math.log(2)
AT_START = {  # loss settings: first-step loss (beta 0.1)
    "exo_pair": ({"label_smoothing": 1e-3}, 0.5 * math.log(0.5 / 0.999) + 0.5 * math.log(0.5 / 1e-3)),
    "nca_pair": ({}, 2 * LN2),
    "sppo_hard": ({}, 2 * 5.0 ** 2),  # (0 - 1/(2 beta))^2 twice
    "apo_zero": ({}, 1.0),
    "apo_down": ({}, 1.0),
    "discopop": ({}, (LN2 + 1) / 2),
    "aot": ({}, LN2),
    "aot_unpaired": ({}, LN2),
    "sigmoid, forward_kl": ({"f_divergence_type": "forward_kl"}, LN2),
    "sigmoid, js_divergence": ({"f_divergence_type": "js_divergence"}, LN2),
    "sigmoid, alpha_divergence": ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}, LN2),
}


@pytest.mark.parametrize("case", list(AT_START))
def test_each_new_loss_type_trains_and_logs(case, tmp_path, tiny_llama, pairs_file, one_torch_thread):
    settings, first_loss = AT_START[case]
    cfg = make_config(tmp_path, tiny_llama, pairs_file, loss={"type": case.split(",")[0], **settings})
    train(cfg)
    steps = read_metrics(tmp_path / "run")
    assert [m["step"] for m in steps] == [1, 2]
    assert steps[0]["loss"] == pytest.approx(first_loss, rel=1e-6)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert all(math.isfinite(m[key]) for m in steps for key in ("loss", "grad_norm", "rewards/margins"))
    assert steps[0]["grad_norm"] > 0  # the loss reaches the weights
    assert steps[1]["rewards/margins"] != 0.0  # and the first step moved the policy


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
def test_aot_is_refused_across_processes(name, tmp_path, tiny_llama, pairs_file, monkeypatch):
    """Each process would sort only its own pairs; refused before the model loads."""
    monkeypatch.setattr("preftune.distributed.setup_distributed", lambda config: types.SimpleNamespace(world_size=2))
    cfg = make_config(tmp_path, tiny_llama, pairs_file, loss={"type": name})
    with pytest.raises(UserError, match=rf"loss\.type {name} sorts margins across one micro-batch, and each of "
                                        r"the 2 processes would sort its own; .* train\.batch_size: 8"):
        train(cfg)
