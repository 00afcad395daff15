"""What a person watching a run sees and keeps: the logged learning rate, the console lines,
the closing summary."""

import math

import pytest
from preftune_test_data import make_config, read_metrics

import preftune.train as train_module
from preftune.train import train


def _record_used_rates(monkeypatch) -> list[float]:
    """The learning rate of every optimizer.step() the run takes, as the optimizer sees it."""
    used: list[float] = []
    build = train_module.build_optimizer

    def recording(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", recording)
    return used


@pytest.mark.parametrize("scheduler, multipliers", [
    # 2 warmup steps ((i + 1) / 3), then decay over the 4 steps left: i = 2..5 of 6.
    ("linear", [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [1 / 3, 2 / 3, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                0.5 * (1 + math.cos(3 * math.pi / 4))]),
])
def test_logged_learning_rate_is_the_rate_the_step_used(tmp_path, tiny_llama, pairs_file, monkeypatch,
                                                        one_torch_thread, scheduler, multipliers):
    # HF's Trainer logs the rate the optimizer step used; logging the one after
    # scheduler.step() shifts the curve a step early (a first step at twice its warmup rate,
    # and a last step at 0 that never trains).
    used = _record_used_rates(monkeypatch)
    lr = 1e-3
    train(make_config(tmp_path, tiny_llama, pairs_file, train={"max_steps": 6},
                      optim={"lr": lr, "scheduler": scheduler, "warmup_steps": 2}))
    logged = [m["learning_rate"] for m in read_metrics(tmp_path / "run", "learning_rate")]
    assert used == pytest.approx([lr * m for m in multipliers], rel=1e-9)
    assert logged == pytest.approx(used, rel=1e-9)
