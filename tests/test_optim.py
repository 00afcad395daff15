"""Weight decay as Hugging Face Trainer (and TRL's DPOTrainer) applies it: not to biases nor
normalization weights; and a checkpoint of the earlier one-group optimizer still resumes."""

import pytest
import torch
from preftune_test_data import make_config

import preftune.train as train_module
from preftune.config import validate_config
from preftune.demo.tiny import build_model
from preftune.optim import build_optimizer, decays, parameter_groups
from preftune.train import train


def hf_decayed(model) -> set[str]:
    """What transformers' Trainer decays, among the trainable parameters."""
    from transformers import Trainer

    names = set(Trainer.get_decay_parameter_names(None, model))
    return {name for name, p in model.named_parameters() if p.requires_grad and name in names}


def optim_config(**optim):
    return validate_config({"model": {"path": "x"}, "data": {"train": "x"}, "optim": optim}).optim


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])  # RMSNorm; LayerNorm with bias, Conv1D; q/k/v biases
def test_weight_decay_spares_biases_and_norm_weights_as_hf_trainer_does(arch):
    model = build_model(arch, vocab_size=64, hidden_size=32)
    decayed = {name for name, d in decays(model).items() if d}
    assert decayed == hf_decayed(model)
    assert any("bias" in name for name in decays(model)) == (arch != "llama")
    optimizer = build_optimizer(parameter_groups(model, 0.1), optim_config(weight_decay=0.1), torch.device("cpu"))
    name_of = {id(p): name for name, p in model.named_parameters()}
    groups = [({name_of[id(p)] for p in g["params"]}, g["weight_decay"]) for g in optimizer.param_groups]
    assert groups == [(decayed, 0.1), (set(decays(model)) - decayed, 0.0)]
    # A step with no gradient moves only what is decayed.
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved == decayed


def test_lora_adapters_are_all_decayed_in_one_group():
    pytest.importorskip("peft")
    from preftune.lora import apply_lora

    lora = validate_config({"model": {"path": "x", "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
                            "data": {"train": "x"}}).model.lora
    model = apply_lora(build_model("llama", vocab_size=64, hidden_size=32), lora)
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert {name for name, d in decays(model).items() if d} == hf_decayed(model) == set(decays(model))
    [group] = parameter_groups(model, 0.1)
    assert group["params"] == adapters


def test_no_weight_decay_keeps_one_group_as_before():
    model = build_model("gpt2", vocab_size=64, hidden_size=32)
    assert parameter_groups(model, 0.0) == list(model.parameters())
    assert len(build_optimizer(parameter_groups(model, 0.0), optim_config(), torch.device("cpu")).param_groups) == 1


def _by_name(policy, optimizer) -> dict:
    """Each trainable parameter's first moment (whole, under fsdp too) and weight decay, by name."""
    name_of = {id(p): name for name, p in policy.named_parameters()}

    def whole(tensor):
        return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()

    return {name_of[id(p)]: (whole(optimizer.state[p]["exp_avg"]), g["weight_decay"])
            for g in optimizer.param_groups for p in g["params"]}


def _train_alone(config, resume=None):
    import torch.distributed as torch_dist

    try:
        train(config, resume=resume)
    finally:  # an fsdp run of one process leaves its process group behind
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


# The three ways optimizer state comes back: positional (none/ddp), sharded (DCP, fsdp), and
# positional read into an fsdp run; that last one for a checkpoint of two groups too.
@pytest.mark.parametrize("written, resumed, one_group", [("none", "none", True), ("fsdp", "fsdp", True),
                                                         ("none", "fsdp", True), ("none", "fsdp", False)])
def test_checkpoint_of_the_one_group_optimizer_resumes_each_parameter_with_its_own_state(
        tmp_path, tiny_model_factory, pairs_file, monkeypatch, one_torch_thread, written, resumed, one_group):
    gpt2 = tiny_model_factory("gpt2")

    def config(strategy):
        return make_config(tmp_path, gpt2, pairs_file, "old",
                           optim={"weight_decay": 0.1, "scheduler": "linear", "warmup_steps": 2},
                           train={"max_steps": 4, "save_every": 2, "distributed": strategy})

    # The earlier preftune: every trainable parameter in one group, all decayed.
    saved, save = {}, train_module._save

    def recording_save(output_dir, state, policy, tokenizer, optimizer, *args):
        if state.step == 2:
            saved.update(_by_name(policy, optimizer))
        return save(output_dir, state, policy, tokenizer, optimizer, *args)

    with monkeypatch.context() as patch:
        if one_group:
            patch.setattr(train_module, "parameter_groups",
                          lambda model, weight_decay: [p for p in model.parameters() if p.requires_grad])
        patch.setattr(train_module, "_save", recording_save)
        _train_alone(config(written))
    assert {weight_decay for _, weight_decay in saved.values()} == ({0.1} if one_group else {0.1, 0.0})

    restored, rates = {}, []
    restore = train_module._restore

    def recording_restore(folder, policy, optimizer, *args):
        state = restore(folder, policy, optimizer, *args)
        restored.update(_by_name(policy, optimizer))
        optimizer.register_step_pre_hook(lambda opt, *_: rates.append([g["lr"] for g in opt.param_groups]))
        return state

    monkeypatch.setattr(train_module, "_restore", recording_restore)
    _train_alone(config(resumed), resume=str(tmp_path / "old" / "checkpoints" / "step-000002"))

    decayed = decays(build_model("gpt2", vocab_size=64))
    assert restored.keys() == saved.keys() == decayed.keys()
    for name, (moment, weight_decay) in restored.items():
        assert torch.equal(moment, saved[name][0]), name
        assert weight_decay == (0.1 if decayed[name] else 0.0), name
    # Steps 3 and 4 of the linear schedule (2 warmup steps, then decay over 2), in both groups.
    assert rates == [[1e-3, 1e-3], [5e-4, 5e-4]]
