"""LD-DPO (`loss.ld_alpha`) and WPO (`loss.wpo_weighting`): the same numbers on every path.

Each path (padded, packed, prompt-shared; chunked, checkpointed, naive; a frozen head; no grad)
is held to `plain`, the textbook computation written here from the full logits of a padded batch
with TRL's masks, values and gradients; the reference variants (copy, precompute, LoRA's base)
to the same; the loss to numbers worked out by hand. tests/test_trl_parity.py holds both to TRL.
"""

import contextlib
import math
from pathlib import Path

import pytest
import torch
import yaml
from preftune_test_data import make_config, read_metrics
from torch import nn

from preftune.config import validate_config
from preftune.data.collate import collate_pairs, pack_pairs
from preftune.data.shared_prompt import collate_shared_prompt
from preftune.data.tokenize import TokenizedPair
from preftune.demo.tiny import build_model
from preftune.logprobs import (
    completion_logps,
    length_desensitized_sums,
    naive_completion_logps,
    per_sequence_sums,
    shared_prompt_logps,
)
from preftune.losses import PairLogps, preference_loss
from preftune.token_stats import WPO, chunk_token_stats, wpo_weights
from preftune.train import train

VOCAB = 97
# Chosen longer than rejected, shorter, and as long; prompts of 3, 6 and 1 tokens.
PAIRS = [TokenizedPair([5, 6, 7], [8, 9, 10, 11], [12], index=0),
         TokenizedPair([13, 14, 15, 16, 17, 18], [19], [20, 21, 22, 23, 24], index=1),
         TokenizedPair([25], [26, 27], [28, 29], index=2)]
GRAD_WEIGHTS = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0])  # distinct per-sequence gradients


def plain(model, pairs, ld_alpha=None):
    """Per-sequence sums (2B,) with grad, and WPO weights (2B,), from the full (2B, T, V) logits.

    TRL's convention: a completion token's place counts 1, 2, ... along the row; l_p is the
    smaller completion length of the pair; tokens at places <= l_p count once, the rest ld_alpha.
    """
    batch = collate_pairs(pairs, pad_token_id=0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    log_probs = logits.log_softmax(-1)  # (2B, T-1, V)
    token = log_probs.gather(2, batch.input_ids[:, 1:, None]).squeeze(2)  # (2B, T-1)
    mask = batch.completion_mask[:, 1:].float()
    lengths = mask.sum(1)
    b = len(pairs)
    if ld_alpha is None:
        sums = (token * mask).sum(1)
    else:
        shared = torch.minimum(lengths[:b], lengths[b:]).repeat(2)  # (2B,)
        head = mask * (mask.cumsum(1) <= shared[:, None])
        sums = (token * head).sum(1) + ld_alpha * (token * (mask - head)).sum(1)
    log_sum_sq = torch.logsumexp(2 * log_probs, -1)  # log sum_v p(v)^2
    weights = torch.exp(((token - log_sum_sq) * mask).sum(1) / lengths).detach()
    return sums, lengths.long(), weights


class WrappedHead(nn.Linear):  # a subclass, as LoRA or quantized heads are: the checkpointed path
    pass


def _model(frozen_head=False, wrapped_head=False, naive=False):
    torch.manual_seed(0)
    model = build_model("qwen2", vocab_size=VOCAB, hidden_size=32, num_layers=2).eval()
    if wrapped_head:
        head = WrappedHead(32, VOCAB, bias=False)
        head.weight.data.copy_(model.lm_head.weight.data)
        model.lm_head = head
    if frozen_head:
        model.lm_head.requires_grad_(False)
    if naive:  # as for a model whose logits are not lm_head(hidden): the naive path
        model._preftune_head_gives_logits = False
    return model


def _padded(model, ld, stats, chunk, pairs=PAIRS):
    b = collate_pairs(pairs, pad_token_id=0)
    return completion_logps(model, b.input_ids, b.attention_mask, b.completion_mask, chunk, ld_alpha=ld, stats=stats)


def _packed(model, ld, stats, chunk, pairs=PAIRS):
    b = pack_pairs(pairs)
    return completion_logps(model, b.input_ids, None, b.completion_mask, chunk, b.position_ids, b.sequence_ids,
                            ld_alpha=ld, stats=stats)


def _packed_naive(model, ld, stats, chunk, pairs=PAIRS):
    b = pack_pairs(pairs)
    return naive_completion_logps(model, b.input_ids, None, b.completion_mask, b.position_ids, b.sequence_ids,
                                  ld, stats)


def _shared(model, ld, stats, chunk, pairs=PAIRS):
    return shared_prompt_logps(model, collate_shared_prompt(pairs, pad_token_id=0).shared, chunk, ld, stats)


# (layout, model options, chunk size): 3 makes several chunks (RECOMPUTE); 1024 keeps one chunk's
# logits (KEEP_LOGITS); a frozen head works out d/d hidden in the forward (HIDDEN_GRAD).
PATHS = {
    "padded, chunks": (_padded, {}, 3),
    "padded, one chunk": (_padded, {}, 1024),
    "padded, frozen head": (_padded, {"frozen_head": True}, 3),
    "padded, checkpointed head": (_padded, {"wrapped_head": True}, 3),
    "padded, naive": (_padded, {"naive": True}, 3),
    "packed, chunks": (_packed, {}, 3),
    "packed, naive": (_packed_naive, {}, 3),
    "prompt shared, chunks": (_shared, {}, 3),
    "prompt shared, frozen head": (_shared, {"frozen_head": True}, 1024),
}
SETTINGS = {"ld 0.3 + wpo": (0.3, True), "ld 0": (0.0, False), "wpo": (None, True)}


def _grads(model, sums):
    model.zero_grad(set_to_none=True)
    (sums * GRAD_WEIGHTS).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_gives_the_plain_numbers_and_gradients(path, setting):
    layout, options, chunk = PATHS[path]
    ld, wpo = SETTINGS[setting]
    model = _model(**options)
    expected_sums, expected_counts, expected_weights = plain(model, PAIRS, ld)
    expected_grads = _grads(model, expected_sums)
    got = layout(model, ld, (WPO,) if wpo else (), chunk)
    assert len(got) == (3 if wpo else 2)
    torch.testing.assert_close(got[0], expected_sums, rtol=1e-5, atol=1e-5)
    assert got[1].tolist() == expected_counts.tolist() == [4, 1, 2, 1, 5, 2]
    if wpo:
        assert not got[2][WPO].requires_grad  # WPO's weights are constants
        torch.testing.assert_close(wpo_weights(got[2][WPO], got[1]), expected_weights, rtol=1e-5, atol=1e-6)
    got_grads = _grads(model, got[0])
    assert got_grads.keys() == expected_grads.keys() and len(got_grads) > 10
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("path", ["padded, chunks", "packed, chunks", "prompt shared, chunks", "padded, naive"])
def test_without_grad_as_a_reference_runs(path):
    layout, options, chunk = PATHS[path]
    model = _model(**options)
    with torch.no_grad():
        expected = plain(model, PAIRS, 0.6)
        got = layout(model, 0.6, (WPO,), chunk)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wpo_weights(got[2][WPO], got[1]), expected[2], rtol=1e-5, atol=1e-6)


def test_ld_alpha_one_is_plain_dpo_and_ld_changes_only_the_longer_response():
    model = _model()
    with torch.no_grad():
        dpo = _padded(model, None, (), 3)[0]
        one = _padded(model, 1.0, (), 3)[0]
        half = _padded(model, 0.5, (), 3)[0]
    torch.testing.assert_close(one, dpo, rtol=1e-6, atol=1e-6)
    # Pair 0: chosen 4 tokens, rejected 1; pair 1: 1 and 5; pair 2: 2 and 2 (untouched).
    changed = (half - dpo).abs() > 1e-4
    assert changed.tolist() == [True, False, False, False, True, False]


# ------------------------------------------------------------------------------ by hand


def test_length_desensitized_sums_by_hand():
    # Pair 0: chosen tokens -1, -2, -3 (3), rejected -4, -5 (2): l_p = 2.
    # Pair 1: chosen -6 (1), rejected -7, -8 (2): l_p = 1. Tokens in any grouping, each
    # sequence's in order: chosen 0's third token comes last.
    token_logps = torch.tensor([-1.0, -2.0, -6.0, -4.0, -5.0, -7.0, -8.0, -3.0])
    owner = torch.tensor([0, 0, 1, 2, 2, 3, 3, 0])
    counts = torch.tensor([3, 1, 2, 2])
    got = length_desensitized_sums(token_logps, owner, counts, 0.25)
    # chosen 0: -1 - 2 + 0.25 * -3; chosen 1: -6; rejected 0: -4 - 5; rejected 1: -7 + 0.25 * -8
    assert got.tolist() == [-3.75, -6.0, -9.0, -9.0]
    sums, got_counts = per_sequence_sums(token_logps, owner, 4, ld_alpha=0.25)
    assert sums.tolist() == [-3.75, -6.0, -9.0, -9.0] and got_counts.tolist() == [3, 1, 2, 2]


def test_wpo_weights_by_hand():
    # Two tokens of one sequence, two of another. A token with p(y_t) = 1/2 under a distribution
    # (1/2, 1/2): sum p^2 = 1/2, so p / sum p^2 = 1. With p(y_t) = 1/4 under (1/4, 3/4):
    # sum p^2 = 10/16, ratio 0.4. Sequence 0 holds both: w = exp((log 1 + log 0.4) / 2) = sqrt(0.4).
    logits = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.25, 0.75], [0.25, 0.75]]))
    targets = torch.tensor([0, 0, 1, 1])
    (aligned,) = chunk_token_stats(logits, targets, (WPO,))
    torch.testing.assert_close(aligned, torch.log(torch.tensor([1.0, 0.4, 1.2, 1.2])))
    _, counts, sums = per_sequence_sums(torch.zeros(4), torch.tensor([0, 0, 1, 1]), 2, token_stats={WPO: aligned})
    got = wpo_weights(sums[WPO], counts)
    # Sequence 1: p = 3/4 under (1/4, 3/4) twice: ratio 0.75 / 0.625 = 1.2, w = 1.2 (above 1).
    torch.testing.assert_close(got, torch.tensor([math.sqrt(0.4), 1.2]))


def test_wpo_multiplies_each_pairs_loss_by_its_weights():
    # One pair with h = 0: DPO's loss is ln 2; pair weights 0.5 make it ln 2 / 2.
    zero = torch.zeros(2)
    logps = PairLogps(zero, zero, zero, zero, torch.ones(2), torch.ones(2), pair_weights=torch.tensor([0.5, 2.0]))
    cfg = validate_config({"model": {"path": "x"}, "data": {"train": "x"},
                           "loss": {"type": ["sigmoid", "sppo_hard"], "weights": [1.0, 2.0],
                                    "wpo_weighting": True}}).loss
    # sppo_hard at logratios 0 with beta 0.1: (0 - 5)^2 + (0 + 5)^2 = 50, weight 2: 100.
    expected = torch.tensor([0.5, 2.0]) * (math.log(2) + 100.0)
    torch.testing.assert_close(preference_loss(logps, cfg), expected)


# ------------------------------------------------------------------------------ config


def _config(**loss):
    return validate_config({"model": {"path": "x"}, "data": {"train": "x"}, "loss": loss})


@pytest.mark.parametrize("loss, message", [
    ({"ld_alpha": 1.5}, "less than or equal to 1"),
    ({"ld_alpha": -0.1}, "greater than or equal to 0"),
    ({"type": ["sigmoid", "sft"], "ld_alpha": 0.5}, "loss.ld_alpha discounts a response's tokens past the "
     "shorter response's length, so sft would no longer be the NLL of the whole chosen response (TRL's sft is "
     "not discounted); remove loss.ld_alpha or sft"),
    ({"type": "aot", "wpo_weighting": True}, "loss.wpo_weighting weighs each pair's loss, but loss.type aot "
     "sorts margins across the batch, so its entries are not pairs; remove loss.wpo_weighting or those loss types"),
])
def test_settings_are_refused_where_they_cannot_apply(loss, message):
    from preftune.errors import UserError

    with pytest.raises(UserError) as caught:
        _config(**loss)
    assert message in str(caught.value)


def test_defaults_are_off():
    loss = _config().loss
    assert loss.ld_alpha is None and loss.wpo_weighting is False


# ------------------------------------------------------------------------------ reference


def test_reference_cache_key_includes_ld_alpha(tiny_llama):
    from preftune.reference import cache_key

    def key(**loss):
        cfg = validate_config({"model": {"path": str(tiny_llama)}, "data": {"train": "x"}, "loss": loss})
        return cache_key(cfg, PAIRS, "train")

    assert len({key(), key(ld_alpha=0.5), key(ld_alpha=0.25), key(wpo_weighting=True)}) == 3
    assert key() == key(wpo_weighting=True)  # WPO reads the policy only


def test_lora_reference_is_the_base_with_ld(tiny_llama):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from preftune.lora import apply_lora
    from preftune.reference import AdapterDisabledReference, FrozenModelReference

    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), validate_config(
        {"model": {"path": "x", "lora": lora}, "data": {"train": "x"}}).model.lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # adapters that really change the output
    with torch.no_grad():
        expected = plain(base, PAIRS, 0.4)[0]
    for batch in (collate_pairs(PAIRS, 0), collate_shared_prompt(PAIRS, 0), pack_pairs(PAIRS)):
        torch.testing.assert_close(AdapterDisabledReference(model, 3, contextlib.nullcontext, 0.4)(batch),
                                   expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(FrozenModelReference(base, 3, contextlib.nullcontext, 0.4)(batch),
                                   expected, rtol=1e-5, atol=1e-5)


def _run(tmp_path, model_path, pairs_file, out, overwrite=False, **sections):
    data = {"eval_fraction": 0.25, **sections.pop("data", {})}
    cfg = make_config(tmp_path, model_path, pairs_file, out, data=data,
                      train={"max_steps": 3, "eval_every": 3}, **sections)
    train(cfg, overwrite=overwrite)
    return read_metrics(tmp_path / out) + read_metrics(tmp_path / out, "eval/loss")


def _assert_same(a, b, tol=1e-5):
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for key in ("loss", "eval/loss", "rewards/margins", "logps/chosen", "grad_norm"):
            if key in x:
                assert x[key] == pytest.approx(y[key], abs=tol), key


def test_training_is_the_same_on_every_layout_and_reference(tmp_path, tiny_llama, pairs_file):
    """LD-DPO and WPO together: prompt-shared (the CPU default), padded and packed batches, and the
    live reference copy against the precomputed one, give the same losses and eval losses."""
    loss = {"ld_alpha": 0.5, "wpo_weighting": True}
    shared = _run(tmp_path, tiny_llama, pairs_file, "shared", loss=loss, data={"share_prompt": True})
    padded = _run(tmp_path, tiny_llama, pairs_file, "padded", loss=loss, data={"share_prompt": False})
    packed = _run(tmp_path, tiny_llama, pairs_file, "packed", loss=loss,
                  data={"share_prompt": False, "packing": "on"})
    pre = _run(tmp_path, tiny_llama, pairs_file, "pre", loss=loss, model={"reference": "precompute"})
    for other in (padded, packed, pre):
        _assert_same(other, shared)
    # Policy = reference at the first step: every margin is 0, so DPO's loss is ln 2 and WPO's
    # ln 2 times the mean pair weight, which is not 1. LD-DPO moves the later steps.
    plain_dpo = _run(tmp_path, tiny_llama, pairs_file, "dpo")
    ld_only = _run(tmp_path, tiny_llama, pairs_file, "ld", loss={"ld_alpha": 0.5})
    assert plain_dpo[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) == ld_only[0]["loss"]
    assert abs(shared[0]["loss"] - math.log(2)) > 1e-3
    assert abs(ld_only[2]["loss"] - plain_dpo[2]["loss"]) > 1e-4
    # ld_alpha changes the precompute cache's key: a second table, not the first one's numbers.
    _run(tmp_path, tiny_llama, pairs_file, "pre", overwrite=True, loss={"ld_alpha": 0.25},
         model={"reference": "precompute"})
    assert len(list((tmp_path / "pre" / "reference_logps").glob("*.safetensors"))) == 4


def test_a_step_with_ld_and_wpo_never_waits_for_the_device(tmp_path, tiny_llama, pairs_file, monkeypatch):
    from test_host_work import device_waits_in_steps

    config = make_config(tmp_path, tiny_llama, pairs_file, data={"share_prompt": False},
                         train={"max_steps": 2}, loss={"ld_alpha": 0.5, "wpo_weighting": True})
    waits = device_waits_in_steps(config, monkeypatch)
    assert len(read_metrics(tmp_path / "run")) == 2
    assert not waits, "".join(waits[0])


def test_eval_pairs_on_a_run_with_ld_and_wpo_gives_the_eval_numbers_it_logged(tmp_path, tiny_llama, pairs_file):
    """`preftune eval pairs` reads loss.ld_alpha and loss.wpo_weighting from the run's config and
    computes as the run's evaluation did: its last eval/ line again."""
    from preftune.evaluate import evaluate_pairs_file

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(Path(pairs_file).read_text())
    cfg = make_config(tmp_path, tiny_llama, pairs_file, "run", data={"eval": str(eval_file)},
                      train={"max_steps": 2, "eval_every": 2}, loss={"ld_alpha": 0.5, "wpo_weighting": True})
    train(cfg)
    logged = read_metrics(tmp_path / "run", "eval/loss")[-1]
    record = evaluate_pairs_file(tmp_path / "run" / "final", eval_file, out=tmp_path / "out")
    for key in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert record[f"eval/{key}"] == pytest.approx(logged[f"eval/{key}"], abs=1e-6), key
    # The settings did change the numbers: without them in the run's config, others come out.
    run_config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert run_config["loss"].pop("ld_alpha") == 0.5 and run_config["loss"].pop("wpo_weighting") is True
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(run_config))
    plain_record = evaluate_pairs_file(tmp_path / "run" / "final", eval_file, out=tmp_path / "out")
    assert abs(plain_record["eval/loss"] - record["eval/loss"]) > 1e-4
    assert abs(plain_record["eval/logps/chosen"] - record["eval/logps/chosen"]) > 1e-4


def test_eval_pairs_with_a_loss_they_cannot_apply_to_drops_them(tmp_path):
    """--loss aot on a WPO run, --loss sigmoid,sft on an LD-DPO run: the run's setting is left
    out, as any run setting the new loss types never use is (the config would refuse it)."""
    from preftune.evaluate import pairs_eval_config

    run = {"model": {"path": "m"}, "loss": {"type": "sigmoid", "ld_alpha": 0.5, "wpo_weighting": True}}
    kept = pairs_eval_config("m", "d.jsonl", run, None, "ipo", 4, None, "float32").loss
    assert kept.ld_alpha == 0.5 and kept.wpo_weighting is True
    aot = pairs_eval_config("m", "d.jsonl", run, None, "aot", 4, None, "float32").loss
    assert aot.ld_alpha == 0.5 and aot.wpo_weighting is False
    rpo = pairs_eval_config("m", "d.jsonl", run, None, "sigmoid,sft", 4, None, "float32").loss
    assert rpo.ld_alpha is None and rpo.wpo_weighting is True


@pytest.mark.slow
def test_compile_with_ld_and_wpo_trains_like_eager_in_one_graph(tmp_path, tiny_llama, pairs_file):
    from torch._dynamo.utils import counters

    loss = {"ld_alpha": 0.5, "wpo_weighting": True}
    eager = _run(tmp_path, tiny_llama, pairs_file, "eager", loss=loss, data={"share_prompt": False})
    counters.clear()
    compiled = _run(tmp_path, tiny_llama, pairs_file, "compiled", loss=loss, model={"compile": True})
    _assert_same(compiled, eager, tol=1e-4)
    assert dict(counters["graph_break"]) == {}
