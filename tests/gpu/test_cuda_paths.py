"""The GPU code paths on a real GPU: they skip without CUDA (so in CI), and are run on the
device machines by `bash bench/gpu.sh` with GPU_BENCH_TESTS=1.

- A training step waits for the device as often as tests/test_host_work.py says it does on CPU:
  CUDA's own detector of synchronising calls (`torch.cuda.set_sync_debug_mode`) counts them,
  host-to-device copies included, which a CPU cannot show.
- CUDA graphs (`model.compile_mode: reduce-overhead`) train like eager.
- bf16 autocast with fused AdamW starts at ln 2 and stays finite.
- The LM-head log-prob function equals the naive computation under bf16 autocast on CUDA, with
  each of its saving strategies (CUDA's matmuls and reductions are not CPU's).
"""

import math
import warnings

import pytest
import torch
from preftune_test_data import make_config, read_metrics

import preftune.train as train_module
from preftune.logprobs import HIDDEN_GRAD, KEEP_LOGITS, RECOMPUTE, LinearTokenLogps
from preftune.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_config(tmp_path, model, pairs, out, **sections):
    train_section = {"device": "cuda", "max_steps": 4, **sections.pop("train", {})}
    return make_config(tmp_path, model, pairs, out, train=train_section, **sections)


def test_a_cuda_step_waits_once_plus_transformers_mask_check(tmp_path, tiny_llama, pairs_file, monkeypatch):
    waits_per_step = []
    original_step = train_module.train_step

    def counted_step(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original_step(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                waits_per_step.append(sum("synchronizing" in str(w.message) for w in caught))

    monkeypatch.setattr(train_module, "train_step", counted_step)
    train(cuda_config(tmp_path, tiny_llama, pairs_file, "run", model={"reference": "precompute"}))
    print(f"device waits per step on CUDA: {waits_per_step}")
    # One read of the step's results, and transformers' mask check in the policy's forward.
    assert max(waits_per_step[1:]) <= 2, waits_per_step


def test_cuda_graphs_train_like_eager(tmp_path, tiny_llama, pairs_file):
    same = {"data": {"group_by_length": False}, "train": {"batch_size": 4}}
    train(cuda_config(tmp_path, tiny_llama, pairs_file, "eager", **same))
    train(cuda_config(tmp_path, tiny_llama, pairs_file, "graphs",
                      model={"compile": True, "compile_mode": "reduce-overhead"}, **same))
    eager, graphs = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "graphs")
    assert [m["loss"] for m in graphs] == pytest.approx([m["loss"] for m in eager], abs=1e-4)
    assert [m["grad_norm"] for m in graphs] == pytest.approx([m["grad_norm"] for m in eager], rel=1e-3)


def test_bf16_autocast_with_fused_adamw_on_cuda(tmp_path, tiny_llama, pairs_file):
    train(cuda_config(tmp_path, tiny_llama, pairs_file, "bf16", model={"autocast": "bfloat16"},
                      optim={"fused": True}))
    metrics = read_metrics(tmp_path / "bf16")
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)


@pytest.mark.parametrize("strategy", [RECOMPUTE, KEEP_LOGITS, HIDDEN_GRAD])
def test_head_strategies_match_naive_under_bf16_on_cuda(strategy):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(96, 64, device="cuda", generator=g, requires_grad=True)
    head = torch.nn.Linear(64, 1000, device="cuda")
    head.requires_grad_(strategy != HIDDEN_GRAD)  # HIDDEN_GRAD is for a frozen head
    targets = torch.randint(0, 1000, (96,), device="cuda", generator=g)
    upstream = torch.randn(96, device="cuda", generator=g)

    def grads(fn):
        h.grad = None
        head.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn()
        (out * upstream).sum().backward()
        return [out.detach(), h.grad] + [p.grad for p in head.parameters()]

    expected = grads(lambda: torch.log_softmax(head(h).float(), -1).gather(1, targets[:, None]).squeeze(1))
    got = grads(lambda: LinearTokenLogps.apply(h, head.weight, head.bias, targets, 32, strategy))
    for a, b in zip(got, expected):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
