"""The fast paths give the same training as the plain ones: precomputed reference log-probs,
LoRA with the adapter-disabled reference, packed batches, bf16 autocast, fused AdamW, compile."""

import json
import math
from pathlib import Path

import pytest
import torch
from preftune_test_data import hub_revision, read_metrics
from preftune_test_data import make_config as shared_make_config
from safetensors.torch import load_file

from preftune.config import validate_config
from preftune.data.collate import collate_pairs, pack_pairs
from preftune.data.tokenize import TokenizedPair
from preftune.optim import build_optimizer
from preftune.packing import packing_is_exact
from preftune.train import train


def make_config(tmp_path, model_path, data_path, out="run", **sections):
    """The shared small config, with an eval split and three steps, so eval curves compare too."""
    data = {"eval_fraction": 0.25, **sections.pop("data", {})}
    steps = {"max_steps": 3, "eval_every": 3, **sections.pop("train", {})}
    return shared_make_config(tmp_path, model_path, data_path, out, data=data, train=steps, **sections)


def assert_same_curves(a, b, keys=("loss", "rewards/margins", "logps/chosen", "grad_norm"), tol=1e-5):
    ma, mb = read_metrics(a), read_metrics(b)
    assert len(ma) == len(mb) == 3
    for x, y in zip(ma, mb):
        for key in keys:
            assert x[key] == pytest.approx(y[key], abs=tol), key
    ea, eb = read_metrics(a, "eval/loss"), read_metrics(b, "eval/loss")
    assert len(ea) == len(eb) == 1
    assert ea[0]["eval/loss"] == pytest.approx(eb[0]["eval/loss"], abs=tol)


# ------------------------------------------------------------------------------ precompute


def test_precomputed_reference_trains_like_the_live_copy_and_caches(tmp_path, tiny_llama, pairs_file):
    train(make_config(tmp_path, tiny_llama, pairs_file, "copy"))
    pre = make_config(tmp_path, tiny_llama, pairs_file, "pre", model={"reference": "precompute"})
    train(pre)
    assert_same_curves(tmp_path / "copy", tmp_path / "pre")
    assert read_metrics(tmp_path / "pre")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    cache = sorted((tmp_path / "pre" / "reference_logps").glob("*.safetensors"))
    assert len(cache) == 2  # train and eval

    # A second run with the same model and data reads the cache: same numbers, no new files.
    stamps = [c.stat().st_mtime_ns for c in cache]
    train(make_config(tmp_path, tiny_llama, pairs_file, "pre", model={"reference": "precompute"}), overwrite=True)
    assert [c.stat().st_mtime_ns for c in sorted(cache)] == stamps
    assert len(list((tmp_path / "pre" / "reference_logps").glob("*.safetensors"))) == 2


def test_precompute_cache_misses_when_tokenization_or_data_change(tmp_path, tiny_llama, pairs_file):
    cfg = make_config(tmp_path, tiny_llama, pairs_file, "pre", model={"reference": "precompute"})
    train(cfg)
    folder = tmp_path / "pre" / "reference_logps"
    first = set(folder.glob("*.safetensors"))
    train(make_config(tmp_path, tiny_llama, pairs_file, "pre", model={"reference": "precompute"},
                      data={"max_length": 24}), overwrite=True)  # truncation changes the token ids
    second = set(folder.glob("*.safetensors"))
    assert len(second) == 4 and first < second
    rows = [json.loads(line) for line in Path(pairs_file).read_text().splitlines()]
    rows[0]["chosen"] += " and a new ending"
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train(make_config(tmp_path, tiny_llama, changed, "pre", model={"reference": "precompute"}), overwrite=True)
    assert len(set(folder.glob("*.safetensors")) - second) >= 1


def test_precompute_cache_key_of_a_hub_model_follows_the_revision_loaded(tmp_path, tiny_llama, monkeypatch):
    """The key named only the hub id, so after the repo got new weights the old revision's
    log-probs were read back as the reference's: a wrong reference, without a word."""
    import huggingface_hub

    from preftune.reference import cache_key

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # offline: conftest
    cfg = validate_config({"model": {"path": "org/tiny", "reference": "precompute"}, "data": {"train": "x"}})
    hub_revision(cache, "org/tiny", tiny_llama, "a" * 40)
    first = cache_key(cfg, [], "train")
    assert cache_key(cfg, [], "train") == first  # the same revision reads its cache back
    hub_revision(cache, "org/tiny", tiny_llama, "b" * 40)  # a new commit on the Hub, downloaded
    assert cache_key(cfg, [], "train") != first
    unknown = validate_config({"model": {"path": "org/unknown", "reference": "precompute"}, "data": {"train": "x"}})
    assert cache_key(unknown, [], "train")  # nothing to resolve: the name alone, as before


# ------------------------------------------------------------------------------ LoRA


LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def test_lora_starts_at_ln2_changes_only_adapters_and_exports(tmp_path, tiny_llama, pairs_file):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from preftune.export_cli import export

    cfg = make_config(tmp_path, tiny_llama, pairs_file, "lora", model={"lora": LORA},
                      train={"save_every": 3})
    train(cfg)
    first = read_metrics(tmp_path / "lora")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    final = tmp_path / "lora" / "final"
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists()
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n)  # B moved from 0

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(final))
    base_state = base.state_dict()
    for name, tensor in tuned.get_base_model().state_dict().items():
        if "lora_" not in name:  # only adapters changed: every base weight is the original
            plain = name.replace(".base_layer", "")
            torch.testing.assert_close(tensor, base_state[plain], atol=0, rtol=0)

    export(tmp_path / "lora", merge=True, out=tmp_path / "merged", base=None)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, atol=1e-5, rtol=1e-5)
        assert (merged(ids).logits - base(ids).logits).abs().max() > 1e-6


def test_lora_reference_is_the_base_model_and_resume_loads_the_adapter(tmp_path, tiny_llama, pairs_file):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from preftune.logprobs import completion_logps
    from preftune.lora import apply_lora
    from preftune.reference import AdapterDisabledReference

    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_llama), validate_config(
        {"model": {"path": "x", "lora": LORA}, "data": {"train": "x"}}).model.lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # adapters that really change the output
    batch = collate_pairs([TokenizedPair([3, 4, 5], [6, 7], [8, 9, 10], index=0)], pad_token_id=0)
    reference = AdapterDisabledReference(model, 64, _null)
    expected, _ = completion_logps(base, batch.input_ids, batch.attention_mask, batch.completion_mask)
    torch.testing.assert_close(reference(batch), expected, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        adapted, _ = completion_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
    assert (adapted - expected).abs().max() > 1e-4

    common = {"save_every": 2, "max_steps": 4, "eval_every": None}
    train(make_config(tmp_path, tiny_llama, pairs_file, "whole", model={"lora": LORA}, train=common))
    train(make_config(tmp_path, tiny_llama, pairs_file, "part", model={"lora": LORA},
                      train={**common, "max_steps": 2}))
    train(make_config(tmp_path, tiny_llama, pairs_file, "part", model={"lora": LORA}, train=common),
          resume=True)
    wa = load_file(str(tmp_path / "whole" / "final" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "part" / "final" / "adapter_model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=0)


def _null():
    import contextlib

    return contextlib.nullcontext()


# ------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packing_is_exact_on_cpu_attention(tiny_model_factory, arch):
    from transformers import AutoModelForCausalLM

    for implementation in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_factory(arch), attn_implementation=implementation)
        assert packing_is_exact(model, torch.device("cpu"), model.config.vocab_size), implementation


def test_pack_pairs_layout():
    pairs = [TokenizedPair([1, 2], [3], [4, 5], index=7), TokenizedPair([6], [7, 8], [9], index=9)]
    batch = pack_pairs(pairs)
    assert batch.input_ids.tolist() == [[1, 2, 3, 6, 7, 8, 1, 2, 4, 5, 6, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1]]
    assert batch.sequence_ids.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3]]
    assert batch.completion_mask.tolist() == [[0, 0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1]]
    assert batch.model_attention_mask is None and batch.num_tokens == 12 and batch.indices == [7, 9]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_training_equals_padded(tmp_path, tiny_model_factory, pairs_file, arch):
    model = tiny_model_factory(arch)
    train(make_config(tmp_path, model, pairs_file, "padded", data={"packing": "off", "share_prompt": False}))
    train(make_config(tmp_path, model, pairs_file, "packed", data={"packing": "on"}))
    assert_same_curves(tmp_path / "padded", tmp_path / "packed")


def test_packing_under_fsdp_packs_and_trains_like_padded(tmp_path, tiny_llama, pairs_file, capsys, recwarn):
    # The start-up check once ran on the already sharded model, failed, and refused packing as
    # if the model mixed packed rows.
    import torch.distributed as torch_dist

    train(make_config(tmp_path, tiny_llama, pairs_file, "padded", data={"packing": "off", "share_prompt": False}))
    try:
        train(make_config(tmp_path, tiny_llama, pairs_file, "packed", data={"packing": "on"},
                          train={"distributed": "fsdp"}))
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    assert "data: packing each micro-batch into one row" in capsys.readouterr().out
    assert not [w for w in recwarn if "packed sequences apart" in str(w.message)]
    assert_same_curves(tmp_path / "padded", tmp_path / "packed", tol=1e-4)  # fsdp rounds otherwise


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_prompt_shared_logps_and_gradients_equal_padded(tiny_model_factory, arch):
    from transformers import AutoModelForCausalLM

    from preftune.data.shared_prompt import collate_shared_prompt
    from preftune.logprobs import completion_logps, shared_prompt_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory(arch)).eval()
    pairs = [TokenizedPair([5, 6, 7], [8, 9, 10, 11], [12], index=0),
             TokenizedPair([13, 14, 15, 16, 17, 18], [19], [20, 21, 22, 23, 24], index=1),
             TokenizedPair([25], [26, 27], [28, 29], index=2)]
    batch = collate_shared_prompt(pairs, pad_token_id=0)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 2.0])
    results = []
    for shared in (None, batch.shared):
        model.zero_grad(set_to_none=True)
        if shared is None:
            sums, counts = completion_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
        else:
            sums, counts = shared_prompt_logps(model, shared, chunk_size=3)
        (sums * weights).sum().backward()
        results.append((sums.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (padded, padded_counts, padded_grads), (shared, shared_counts, shared_grads) = results
    torch.testing.assert_close(shared, padded, atol=1e-5, rtol=1e-5)
    assert shared_counts.tolist() == padded_counts.tolist() == [4, 1, 2, 1, 5, 2]
    for name, grad in padded_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_prompt_shared_layout_stays_within_learned_positions(tiny_model_factory):
    """A GPT-2 of 32 positions, pairs of 31 tokens at most: a long prompt's short rejected response
    was padded with positions counted on to 22 + 23 - 1, and the first forward stopped with an
    IndexError from the position embedding (on CPU, where prompt sharing is the default)."""
    from transformers import AutoModelForCausalLM

    from preftune.data.shared_prompt import collate_shared_prompt
    from preftune.logprobs import completion_logps, shared_prompt_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("gpt2", hidden_size=32, max_positions=32))
    pairs = [TokenizedPair(list(range(5, 27)), [30, 31], [32, 33], index=0),
             TokenizedPair([5, 6], [30, 31], list(range(40, 63)), index=1)]
    assert max(pair.length for pair in pairs) <= 32
    batch = collate_shared_prompt(pairs, pad_token_id=0)
    assert int(batch.shared.second_positions.max()) <= 31
    with torch.no_grad():
        padded, _ = completion_logps(model.eval(), batch.input_ids, batch.attention_mask, batch.completion_mask)
        shared, _ = shared_prompt_logps(model, batch.shared)
    torch.testing.assert_close(shared, padded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_shared_training_equals_padded(tmp_path, tiny_model_factory, pairs_file, arch):
    model = tiny_model_factory(arch)
    train(make_config(tmp_path, model, pairs_file, "padded", data={"share_prompt": False}))
    train(make_config(tmp_path, model, pairs_file, "shared", data={"share_prompt": True}))
    assert_same_curves(tmp_path / "padded", tmp_path / "shared")


@pytest.mark.parametrize("setting, why", [
    ({"model": {"gradient_checkpointing": True}}, "model.gradient_checkpointing cannot run"),
    ({"model": {"compile": True}}, "model.compile cannot run"),
    ({"data": {"packing": "on"}}, "data.packing packs each micro-batch"),
])
def test_share_prompt_true_says_when_it_is_not_used(tiny_llama, setting, why):
    # Asked for explicitly and dropped for another setting, it must not vanish without a word.
    import io

    from rich.console import Console

    from preftune.data.shared_prompt import collate_shared_prompt
    from preftune.modeling import load_causal_lm
    from preftune.packing import choose_collate

    model = load_causal_lm(tiny_llama)
    raw = {"model": {"path": "x", **setting.get("model", {})},
           "data": {"train": "x", "share_prompt": True, **setting.get("data", {})}}
    out = io.StringIO()
    collate = choose_collate(validate_config(raw), model, 0, torch.device("cpu"), Console(file=out, width=400))
    assert collate.func is not collate_shared_prompt
    said = " ".join(out.getvalue().split())
    assert f"data.share_prompt is true, but each pair's prompt runs once per response: {why}" in said
    raw["data"]["share_prompt"] = "auto"  # auto decides quietly, as documented
    out = io.StringIO()
    choose_collate(validate_config(raw), model, 0, torch.device("cpu"), Console(file=out, width=400))
    assert "data.share_prompt" not in out.getvalue()


# ------------------------------------------------------------------------------ precision, optimizer


def test_bf16_autocast_trains_on_cpu_near_float32(tmp_path, tiny_llama, pairs_file):
    train(make_config(tmp_path, tiny_llama, pairs_file, "fp32"))
    train(make_config(tmp_path, tiny_llama, pairs_file, "bf16", model={"autocast": "bfloat16"}))
    fp32, bf16 = read_metrics(tmp_path / "fp32"), read_metrics(tmp_path / "bf16")
    assert bf16[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference, same numerics
    for a, b in zip(fp32, bf16):
        assert math.isfinite(b["loss"]) and b["loss"] == pytest.approx(a["loss"], abs=0.05)


@pytest.mark.parametrize("arch, tied", [("llama", False), ("qwen2", True)])
def test_bf16_reference_copy_gives_the_float32_copys_logps(tiny_model_factory, arch, tied):
    import contextlib
    import copy

    from preftune.logprobs import completion_logps
    from preftune.modeling import freeze, load_causal_lm
    from preftune.reference import FrozenModelReference, compact_reference

    model = load_causal_lm(str(tiny_model_factory(arch, tie_embeddings=tied)), "float32")
    config = validate_config({"model": {"path": "m", "autocast": "bfloat16"}, "data": {"train": "d"}})
    frozen_copy = freeze(copy.deepcopy(model))  # as modeling.make_reference makes it
    compact = compact_reference(FrozenModelReference(frozen_copy, 64, contextlib.nullcontext), config).model
    ids = torch.randint(3, 200, (4, 24), generator=torch.Generator().manual_seed(0))
    mask, completion = torch.ones_like(ids), torch.zeros_like(ids)
    completion[:, 10:] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, _ = completion_logps(model, ids, mask, completion)
        got, _ = completion_logps(compact, ids, mask, completion)
    assert torch.equal(got, expected)
    # Linear weights are bf16 now; norms, embeddings (and a head tied to them) float32.
    dtypes = {name: p.dtype for name, p in compact.named_parameters()}
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == torch.bfloat16
    assert dtypes["model.embed_tokens.weight"] == dtypes["model.norm.weight"] == torch.float32
    assert (compact.lm_head.weight.dtype == torch.float32) == tied
    size = sum(p.numel() * p.element_size() for p in compact.parameters())
    assert size < 0.75 * sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("arch, tied", [("llama", False), ("qwen2", True)])
def test_lora_base_in_bf16_under_autocast_trains_exactly_like_float32(tmp_path, tiny_model_factory, pairs_file,
                                                                      monkeypatch, arch, tied):
    """LoRA's frozen base linears stored in bf16 give the same bits as autocast's own casts."""
    pytest.importorskip("peft")
    import preftune.train

    model = tiny_model_factory(arch, tie_embeddings=tied)
    sections = {"model": {"lora": LORA, "autocast": "bfloat16"}}
    seen = []
    original = preftune.train.compact_frozen_linears

    def spy(policy, config):
        seen.append(original(policy, config))
        seen.append({name: p.dtype for name, p in policy.named_parameters()})
        return seen[0]

    monkeypatch.setattr(preftune.train, "compact_frozen_linears", spy)
    train(make_config(tmp_path, model, pairs_file, "compact", **sections))
    monkeypatch.setattr(preftune.train, "compact_frozen_linears", lambda policy, config: 0)
    train(make_config(tmp_path, model, pairs_file, "float32", **sections))

    assert_same_curves(tmp_path / "compact", tmp_path / "float32", tol=0.0)
    a = load_file(str(tmp_path / "compact" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "float32" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    compacted, dtypes = seen
    base = {n: d for n, d in dtypes.items() if "lora_" not in n}
    assert compacted > 0 and sum(d == torch.bfloat16 for d in base.values()) > 0
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)  # adapters train in float32
    assert all(d == torch.float32 for n, d in base.items() if "norm" in n or "embed" in n)


def test_gradient_checkpointing_gives_the_same_training(tmp_path, tiny_llama, pairs_file):
    train(make_config(tmp_path, tiny_llama, pairs_file, "plain"))
    train(make_config(tmp_path, tiny_llama, pairs_file, "ckpt", model={"gradient_checkpointing": True}))
    assert_same_curves(tmp_path / "plain", tmp_path / "ckpt")


def test_fused_adamw_is_the_default_on_cpu_and_matches_the_loop():
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
    cfg = validate_config({"model": {"path": "x"}, "data": {"train": "x"}, "optim": {"lr": 0.1}}).optim
    fused = build_optimizer(params, cfg, torch.device("cpu"))
    assert fused.defaults["fused"] is True
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = build_optimizer(twins, cfg.model_copy(update={"fused": False}), torch.device("cpu"))
    for _ in range(3):
        for group in (params, twins):
            for p in group:
                p.grad = torch.ones_like(p) * p.detach().sin()
        fused.step()
        plain.step()
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_cuda_graph_modes_off_cuda_say_they_compile_without_graphs(tmp_path, tiny_llama, pairs_file,
                                                                  monkeypatch, capsys):
    """torch skips CUDA graphs on a CPU without a word; the run says so, once, at start-up."""
    from preftune.distributed import DistContext, start_notes

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # the note is tested, not compile
    train(make_config(tmp_path, tiny_llama, pairs_file, model={"compile": True, "compile_mode": "reduce-overhead"},
                      train={"device": "cpu"}))
    said = " ".join(capsys.readouterr().out.split())
    assert said.count("model.compile_mode 'reduce-overhead' records CUDA graphs, which need a CUDA device; "
                      "on cpu the run compiles as in mode 'default'.") == 1

    def notes(mode, device):
        config = validate_config({"model": {"path": "x", "compile": True, "compile_mode": mode}, "data": {"train": "x"}})
        return start_notes(config, DistContext(), torch.device(device))

    assert notes("max-autotune", "cpu") == ["model.compile_mode 'max-autotune' records CUDA graphs, which need a "
                                            "CUDA device; on cpu the run compiles as in mode "
                                            "'max-autotune-no-cudagraphs'."]
    assert notes("max-autotune-no-cudagraphs", "cpu") == notes("default", "cpu") == []
    assert notes("reduce-overhead", "cuda") == []


@pytest.mark.slow
def test_compile_trains_like_eager_in_one_graph(tmp_path, tiny_llama, pairs_file):
    from torch._dynamo.utils import counters

    # The padded layout (what compile gets on a GPU too: no prompt sharing under compile).
    train(make_config(tmp_path, tiny_llama, pairs_file, "eager"))
    counters.clear()
    train(make_config(tmp_path, tiny_llama, pairs_file, "compiled", model={"compile": True}))
    assert_same_curves(tmp_path / "eager", tmp_path / "compiled", tol=1e-4)
    # Decoder, LM head and log-prob sums in one graph: no break (a boolean-mask selection,
    # say) splits it into pieces with eager operators and host waits between them.
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] >= 1


@pytest.mark.slow
def test_compile_with_lora_trains_like_eager_in_one_graph(tmp_path, tiny_llama, pairs_file):
    from torch._dynamo.utils import counters

    train(make_config(tmp_path, tiny_llama, pairs_file, "eager", model={"lora": LORA}))
    counters.clear()
    train(make_config(tmp_path, tiny_llama, pairs_file, "compiled", model={"lora": LORA, "compile": True}))
    assert_same_curves(tmp_path / "eager", tmp_path / "compiled", tol=1e-4)
    assert dict(counters["graph_break"]) == {}


@pytest.mark.slow
def test_compile_modes_are_passed_through(tmp_path, tiny_llama, pairs_file):
    # On CPU "reduce-overhead" compiles as "default" does (CUDA graphs need CUDA); what is
    # checked here is that the option reaches torch.compile and the run trains the same.
    train(make_config(tmp_path, tiny_llama, pairs_file, "eager"))
    train(make_config(tmp_path, tiny_llama, pairs_file, "graphs",
                      model={"compile": True, "compile_mode": "reduce-overhead"}))
    eager, graphs = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "graphs")
    assert [m["loss"] for m in graphs] == pytest.approx([m["loss"] for m in eager], abs=1e-4)
