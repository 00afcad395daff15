"""preftune and TRL's DPOTrainer on the same model, data, batch, loss and optimizer agree.

Each step holds all four pairs, so the order in which either tool shuffles them does not matter,
and the reference is a different model than the policy, so the first loss is not trivially ln 2.
"""

import json
import math

import pytest

pytest.importorskip("trl")

from preftune_test_data import PAIRS, write_jsonl  # noqa: E402

from preftune.config import validate_config  # noqa: E402
from preftune.train import train  # noqa: E402

STEPS = 3
SEED = 0  # both tools seed with it before wrapping LoRA adapters


LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


def run_trl(policy_dir, reference_dir, tmp_path, lora=None, lr=1e-3):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, max_steps=STEPS, logging_steps=1, beta=0.1, max_length=256,
        gradient_checkpointing=False, use_cpu=True, report_to=[], save_strategy="no", seed=SEED,
        bf16=False,  # TRL turns on bf16 autocast by default, on CPU too; compare float32 with float32
    )
    peft_config = None
    if lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                 target_modules=lora["target_modules"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(reference_dir) if reference_dir else None,
        args=args, train_dataset=datasets.Dataset.from_list(PAIRS),
        processing_class=AutoTokenizer.from_pretrained(policy_dir), peft_config=peft_config,
    )
    trainer.train()
    return [h for h in trainer.state.log_history if "rewards/margins" in h]


def run_preftune(policy_dir, reference_dir, tmp_path, lora=None, lr=1e-3):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    model = {"path": str(policy_dir)}
    if reference_dir:
        model["reference_path"] = str(reference_dir)
    if lora:
        model["lora"] = lora
    cfg = validate_config({
        "model": model,
        "data": {"train": str(data), "max_length": 256},
        "loss": {"type": "sigmoid", "beta": 0.1},
        "optim": {"lr": lr, "scheduler": "constant", "max_grad_norm": 1.0},
        "train": {"batch_size": 4, "max_steps": STEPS, "output_dir": str(tmp_path / "pt"),
                  "report": False, "progress": False, "seed": SEED},
    })
    train(cfg)
    return [json.loads(line) for line in (tmp_path / "pt" / "metrics.jsonl").read_text().splitlines()]


KEYS = ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/margins", "rewards/accuracies")


def assert_steps_match(ours, theirs):
    assert len(ours) == len(theirs) == STEPS
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        for key in KEYS:
            tol = 1e-5 if step == 1 else 1e-4  # later steps accumulate optimizer rounding
            assert a[key] == pytest.approx(b[key], abs=tol, rel=tol), (step, key, a[key], b[key])


@pytest.mark.slow
def test_losses_and_logps_match_trl(tmp_path, tiny_model_factory):
    policy_dir = tiny_model_factory("qwen2", seed=0)
    reference_dir = tiny_model_factory("qwen2", seed=1)
    ours = run_preftune(policy_dir, reference_dir, tmp_path)
    theirs = run_trl(policy_dir, reference_dir, tmp_path)
    assert not math.isclose(ours[0]["loss"], math.log(2), abs_tol=1e-3)
    assert_steps_match(ours, theirs)
    # The numbers the README quotes: `pytest -s tests/test_trl_parity.py` prints them.
    gap = max(abs(a[k] - b[k]) for a, b in zip(ours, theirs) for k in KEYS)
    print(f"\nfirst loss preftune {ours[0]['loss']:.7f} TRL {theirs[0]['loss']:.7f}; "
          f"largest difference over {STEPS} steps: {gap:.1e}")


@pytest.mark.slow
def test_lora_matches_trl(tmp_path, tiny_model_factory):
    """LoRA on both sides, the reference being the base with adapters off. Both seed with 0
    before wrapping, so the adapters' random A matrices are the same; a large learning rate
    makes steps 2 and 3 depend on them."""
    pytest.importorskip("peft")
    policy_dir = tiny_model_factory("qwen2", seed=0)
    ours = run_preftune(policy_dir, None, tmp_path, lora=LORA, lr=1e-2)
    theirs = run_trl(policy_dir, None, tmp_path, lora=LORA, lr=1e-2)
    assert ours[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy = reference
    assert ours[-1]["loss"] < 0.6  # the adapters learned something: later steps test them
    assert_steps_match(ours, theirs)
    gap = max(abs(a[k] - b[k]) for a, b in zip(ours, theirs) for k in KEYS)
    print(f"\nLoRA: last loss preftune {ours[-1]['loss']:.7f} TRL {theirs[-1]['loss']:.7f}; "
          f"largest difference over {STEPS} steps: {gap:.1e}")
