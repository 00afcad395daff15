"""Chunked completion log-probs equal the naive full-vocabulary computation, values and
gradients, and take a fraction of its memory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from preftune.demo.tiny import build_model
from preftune.logprobs import (
    HIDDEN_GRAD,
    KEEP_LOGITS,
    RECOMPUTE,
    LinearTokenLogps,
    checkpointed_token_logps,
    chunked_token_logps,
    completion_logps,
    naive_completion_logps,
    supports_hidden_state_path,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from logprob_memory import stage_peak_bytes

VOCAB = 97


def _batch(seed=0, rows=4, width=12):
    """Right-padded rows of different lengths, prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (rows, width), generator=g)
    attention_mask = torch.zeros(rows, width, dtype=torch.long)
    completion_mask = torch.zeros(rows, width, dtype=torch.long)
    for r in range(rows):
        length, prompt = width - 2 * r % 5, 2 + r
        attention_mask[r, :length] = 1
        completion_mask[r, prompt:length] = 1
    return input_ids, attention_mask, completion_mask


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(fn, model, batch, weights):
    model.zero_grad(set_to_none=True)
    sums, counts = fn(model, *batch)
    (sums * weights).sum().backward()
    return sums.detach(), counts, _grads(model)


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("gpt2", True),
                                       ("qwen2", False), ("qwen2", True)])
@pytest.mark.parametrize("chunk_size", [5, 1024])
def test_chunked_equals_naive_values_and_gradients(arch, tied, chunk_size):
    torch.manual_seed(0)
    model = build_model(arch, vocab_size=VOCAB, hidden_size=32, num_layers=2, tie_embeddings=tied)
    model.eval()  # no dropout: both sides must see the same network
    _assert_chunked_equals_naive(model, chunk_size)


def _assert_chunked_equals_naive(model, chunk_size):
    batch = _batch()
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # distinct per-row gradients, like DPO's
    naive = _run(naive_completion_logps, model, batch, weights)
    chunked = _run(lambda m, *b: completion_logps(m, *b, chunk_size=chunk_size), model, batch, weights)

    torch.testing.assert_close(chunked[0], naive[0], rtol=1e-5, atol=1e-5)
    assert chunked[1].tolist() == naive[1].tolist() == (batch[2][:, 1:].sum(1)).tolist()
    assert naive[2].keys() == chunked[2].keys() and len(naive[2]) > 10
    for name in naive[2]:
        torch.testing.assert_close(chunked[2][name], naive[2][name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("chunk_size", [5, 1024])
def test_frozen_lm_head_model_gets_the_naive_gradients(chunk_size):
    """As under LoRA: the head takes no gradient, the decoder below it gets the naive ones."""
    torch.manual_seed(0)
    model = build_model("qwen2", vocab_size=VOCAB, hidden_size=32, num_layers=2, tie_embeddings=False)
    model.eval()
    model.lm_head.requires_grad_(False)
    _assert_chunked_equals_naive(model, chunk_size)


def _head_case(bias: bool, seed=0, rows=37, hidden=16, vocab=53):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g, requires_grad=True)
    head = nn.Linear(hidden, vocab, bias=bias)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    upstream = torch.randn(rows, generator=g)
    return h, head, targets, upstream


def _head_grads(fn, h, head, targets, upstream):
    h.grad = None
    head.zero_grad(set_to_none=True)
    out = fn()
    (out * upstream).sum().backward()
    return [out.detach(), h.grad] + [p.grad for p in head.parameters()]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size,strategy", [(8, RECOMPUTE), (37, RECOMPUTE), (1000, RECOMPUTE),
                                                 (8, KEEP_LOGITS)])
def test_linear_function_gradients_of_hidden_weight_and_bias(bias, chunk_size, strategy):
    h, head, targets, upstream = _head_case(bias)

    def naive():
        return torch.log_softmax(head(h), -1).gather(1, targets[:, None]).squeeze(1)

    expected = _head_grads(naive, h, head, targets, upstream)
    got = _head_grads(lambda: LinearTokenLogps.apply(h, head.weight, head.bias, targets, chunk_size, strategy),
                      h, head, targets, upstream)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_function_passes_gradcheck_in_float64():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 9, (6,), generator=g)

    def f(h, w, b):  # the float32 softmax inside bounds the precision; gradcheck with loose tolerance
        return LinearTokenLogps.apply(h, w, b, t, 4, RECOMPUTE)

    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_other_heads_take_the_checkpointed_path_with_equal_results():
    class WrappedHead(nn.Linear):  # a subclass, as LoRA or quantized heads are
        pass

    h, head, targets, upstream = _head_case(bias=False)
    wrapped = WrappedHead(head.in_features, head.out_features, bias=False)
    wrapped.weight.data.copy_(head.weight.data)
    expected = _head_grads(lambda: chunked_token_logps(h, head, targets, 8), h, head, targets, upstream)
    got = _head_grads(lambda: chunked_token_logps(h, wrapped, targets, 8), h, wrapped, targets, upstream)
    direct = _head_grads(lambda: checkpointed_token_logps(h, head, targets, 8), h, head, targets, upstream)
    for a, b, c in zip(got, expected, direct):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-5)


def test_kept_logits_cannot_be_backpropagated_twice_silently():
    h, head, targets, _ = _head_case(bias=False)
    out = LinearTokenLogps.apply(h, head.weight, None, targets, 8, KEEP_LOGITS)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        out.sum().backward()


def test_small_batches_keep_logits_large_ones_recompute(monkeypatch):
    """The policy: keep the (M, V) logits only while they fit KEEP_LOGITS_MAX_BYTES."""
    from preftune import logprobs

    monkeypatch.setattr(logprobs, "KEEP_LOGITS_MAX_BYTES", 4 * 1000 * 10)  # 10 rows of V = 1000
    head = nn.Linear(4, 1000, bias=False)
    seen = []
    original = LinearTokenLogps.apply
    monkeypatch.setattr(LinearTokenLogps, "apply", lambda *args: seen.append(args[5]) or original(*args))
    for rows in (10, 11):
        chunked_token_logps(torch.randn(rows, 4), head, torch.zeros(rows, dtype=torch.long), 64)
    assert seen == [KEEP_LOGITS, RECOMPUTE]


def _frozen_head_case(bias: bool, vocab: int = 53):
    h, head, targets, upstream = _head_case(bias, vocab=vocab)
    head.requires_grad_(False)  # as under LoRA, which leaves lm_head alone
    return h, head, targets, upstream


def _backward_matmuls(out: torch.Tensor, upstream: torch.Tensor) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.matmul):
                CountMatmuls.count += 1
            return func(*args, **(kwargs or {}))

    with CountMatmuls():
        (out * upstream).sum().backward()
    return CountMatmuls.count


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [8, 1000])
def test_frozen_head_gradient_is_worked_out_in_forward(bias, chunk_size):
    """A frozen head (LoRA) needs only grad_hidden: equal to naive, and no matmul in the backward."""
    h, head, targets, upstream = _frozen_head_case(bias)
    assert chunked_token_logps(h, head, targets, chunk_size).grad_fn is not None

    def naive():
        return torch.log_softmax(head(h), -1).gather(1, targets[:, None]).squeeze(1)

    expected = _head_grads(naive, h, head, targets, upstream)
    got = _head_grads(lambda: chunked_token_logps(h, head, targets, chunk_size), h, head, targets, upstream)
    assert len(got) == len(expected) == 2 + int(bias) + 1 and got[2] is None and expected[2] is None
    for a, b in zip(got[:2], expected[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    h.grad = None
    assert _backward_matmuls(chunked_token_logps(h, head, targets, chunk_size), upstream) == 0
    assert _backward_matmuls(LinearTokenLogps.apply(h, head.weight, head.bias, targets, chunk_size, RECOMPUTE),
                             upstream) > 0  # the counter sees the recomputing backward's matmuls


def test_saving_strategy_follows_what_needs_a_gradient(monkeypatch):
    from preftune import logprobs

    h, head, _, _ = _head_case(bias=True)
    assert logprobs.saving_strategy(h, head) == KEEP_LOGITS
    monkeypatch.setattr(logprobs, "KEEP_LOGITS_MAX_BYTES", 0)
    assert logprobs.saving_strategy(h, head) == RECOMPUTE
    head.weight.requires_grad_(False)
    assert logprobs.saving_strategy(h, head) == RECOMPUTE  # the bias still trains
    head.bias.requires_grad_(False)
    assert logprobs.saving_strategy(h, head) == HIDDEN_GRAD
    with torch.no_grad():
        assert logprobs.saving_strategy(h, head) == RECOMPUTE  # nothing to save at all
    assert logprobs.saving_strategy(h.detach(), head) == RECOMPUTE


def test_frozen_head_under_bf16_autocast_matches_naive():
    h, head, targets, upstream = _frozen_head_case(bias=False, vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _head_grads(lambda: torch.log_softmax(head(h).float(), -1).gather(1, targets[:, None]).squeeze(1),
                               h, head, targets, upstream)
        got = _head_grads(lambda: chunked_token_logps(h, head, targets, 16), h, head, targets, upstream)
    for a, b in zip(got[:2], expected[:2]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_bf16_autocast_matches_naive_under_autocast():
    h, head, targets, upstream = _head_case(bias=True, rows=64, vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _head_grads(lambda: torch.log_softmax(head(h).float(), -1).gather(1, targets[:, None]).squeeze(1),
                               h, head, targets, upstream)
        got = _head_grads(lambda: LinearTokenLogps.apply(h, head.weight, head.bias, targets, 16, RECOMPUTE),
                          h, head, targets, upstream)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_no_grad_path_matches():
    model = build_model("qwen2", vocab_size=VOCAB, hidden_size=32, num_layers=1).eval()
    batch = _batch(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(completion_logps(model, *batch, chunk_size=7)[0],
                                   naive_completion_logps(model, *batch)[0], rtol=1e-5, atol=1e-5)


def test_packed_sequences_sum_per_sequence():
    """sequence_ids: several sequences in one row, position ids restarting at each."""
    model = build_model("llama", vocab_size=VOCAB, hidden_size=32, num_layers=2).eval()
    input_ids, attention_mask, completion_mask = _batch(seed=5)
    lengths = attention_mask.sum(1).tolist()
    row_ids = torch.cat([input_ids[r, :n] for r, n in enumerate(lengths)])[None]
    row_completion = torch.cat([completion_mask[r, :n] for r, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    sequence_ids = torch.cat([torch.full((n,), r) for r, n in enumerate(lengths)])[None]
    with torch.no_grad():
        padded = completion_logps(model, input_ids, attention_mask, completion_mask)
        packed = completion_logps(model, row_ids, None, row_completion, position_ids=positions,
                                  sequence_ids=sequence_ids)
        naive_packed = naive_completion_logps(model, row_ids, None, row_completion, positions, sequence_ids)
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(naive_packed[0], padded[0], rtol=1e-5, atol=1e-5)
    assert packed[1].tolist() == padded[1].tolist()


# ------------------------------------------------------------------------------ memory


def test_memory_meter_counts_the_same_with_fake_and_real_tensors():
    shape = {"batch": 2, "length": 64, "hidden": 8, "vocab": 1000}
    assert stage_peak_bytes("naive", **shape, fake=True) == stage_peak_bytes("naive", **shape)
    # naive keeps at least the logits, the log-softmax and its gradient: 3 x (B, T, V) float32
    assert stage_peak_bytes("naive", **shape) >= 3 * 2 * 63 * 1000 * 4


def test_chunked_stage_peak_is_a_fraction_of_naive_at_qwen_vocabulary():
    """Vocabulary 151,936, 8 sequences: the chunked peak is at most 25% of the naive one."""
    shape = {"batch": 8, "length": 256, "hidden": 8, "vocab": 151936}
    naive = stage_peak_bytes("naive", **shape, fake=True)
    chunked = stage_peak_bytes("chunked", **shape, chunk_size=1024)
    assert chunked <= 0.25 * naive, (chunked / 2**30, naive / 2**30)


@pytest.mark.slow
def test_chunked_stage_peak_at_full_size():
    """The issue's size, 8 x 2,048 tokens (about 45 s: the chunked side runs for real)."""
    shape = {"batch": 8, "length": 2048, "hidden": 8, "vocab": 151936}
    naive = stage_peak_bytes("naive", **shape, fake=True)
    chunked = stage_peak_bytes("chunked", **shape, chunk_size=1024)
    assert chunked <= 0.25 * naive, (chunked / 2**30, naive / 2**30)


def _post_processing_model(family: str):
    """Tiny random models whose logits are not the bare LM head of the final hidden states."""
    import transformers

    torch.manual_seed(0)
    small = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, intermediate_size=64)
    if family == "granite":  # logits divided by config.logits_scaling
        config = transformers.GraniteConfig(**small, logits_scaling=4.0)
    elif family == "falcon_h1":  # logits multiplied by config.lm_head_multiplier
        config = transformers.FalconH1Config(**small, lm_head_multiplier=3.0, mamba_d_ssm=32,
                                             mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8)
    else:  # gemma2: soft-capping, invisible on small random logits, so refused by name
        config = transformers.Gemma2Config(**small, head_dim=8, final_logit_softcapping=30.0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["granite", "falcon_h1", "gemma2"])
def test_models_that_post_process_their_logits_take_the_naive_path(family):
    """Granite divides the logits, FalconH1 multiplies them, Gemma 2 soft-caps them: the
    chunked LM head alone would give other log-probs, so these models must not take it."""
    model = _post_processing_model(family)
    assert not supports_hidden_state_path(model)
    _assert_chunked_equals_naive(model, chunk_size=5)


def test_plain_models_keep_the_chunked_path():
    model = build_model("qwen2", vocab_size=VOCAB, hidden_size=32, num_layers=2)
    assert supports_hidden_state_path(model)
