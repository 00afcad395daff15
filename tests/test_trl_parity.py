"""preftune and TRL's DPOTrainer on the same model, data, batch, loss and optimizer agree.

Each step holds all four pairs, so the order in which either tool shuffles them does not matter,
and the reference is a different model than the policy, so the first loss is not trivially ln 2.

Where the two differ on purpose, no test compares them: the `sft` loss on chosen responses of
unequal lengths (averaged per sequence here, as in the RPO paper; over all chosen tokens of the
micro-batch in TRL; with equal lengths the two are one, and compared), truncation of prompts
longer than half of `max_length` (preftune shortens the prompt first, TRL's keep_start cuts the
completion), and an implicit text prompt whose responses part mid-word (preftune cuts the prompt
back to the word boundary, TRL at the differing character).
"""

import json
import math

import pytest

pytest.importorskip("trl")

from preftune_test_data import PAIRS, write_jsonl  # noqa: E402

from preftune.config import validate_config  # noqa: E402
from preftune.demo.tiny import EOS  # noqa: E402
from preftune.train import train  # noqa: E402

STEPS = 3
SEED = 0  # both tools seed with it before wrapping LoRA adapters


LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


def run_trl(policy_dir, reference_dir, tmp_path, lora=None, lr=1e-3, rows=PAIRS, loss=None, batch_size=4,
            grad_accum=1, max_length=256, precompute=False, adam_eps=1e-8, max_grad_norm=1.0):
    """`loss` holds preftune's loss keys (type, weights, beta, label_smoothing and the f-divergence,
    discopop and ld_alpha settings, which TRL names alike, and wpo_weighting, TRL's use_weighting)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    loss = {"type": "sigmoid", "beta": 0.1, **(loss or {})}
    types = [loss["type"]] if isinstance(loss["type"], str) else list(loss["type"])
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_epsilon=adam_eps, max_grad_norm=max_grad_norm or 0.0,  # 0: no clipping
        max_steps=STEPS, logging_steps=1, beta=loss["beta"], max_length=max_length,
        loss_type=types, loss_weights=loss.get("weights"), label_smoothing=loss.get("label_smoothing", 0.0),
        **{key: loss[key] for key in ("f_divergence_type", "f_alpha_divergence_coef", "discopop_tau", "ld_alpha")
           if key in loss},
        use_weighting=loss.get("wpo_weighting", False),
        precompute_ref_log_probs=precompute,
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
        args=args, train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(policy_dir), peft_config=peft_config,
    )
    trainer.train()
    return [h for h in trainer.state.log_history if "rewards/margins" in h]


def run_preftune(policy_dir, reference_dir, tmp_path, lora=None, lr=1e-3, rows=PAIRS, loss=None, batch_size=4,
                 grad_accum=1, max_length=256, reference="copy", data=None, adam_eps=1e-8, max_grad_norm=1.0,
                 train_extra=None):
    data_cfg = data
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    model = {"path": str(policy_dir), "reference": reference}
    if reference_dir:
        model["reference_path"] = str(reference_dir)
    if lora:
        model["lora"] = lora
    cfg = validate_config({
        "model": model,
        "data": {"train": str(data), "max_length": max_length, **(data_cfg or {})},
        "loss": {"type": "sigmoid", "beta": 0.1, **(loss or {})},
        "optim": {"lr": lr, "eps": adam_eps, "scheduler": "constant", "max_grad_norm": max_grad_norm},
        "train": {"batch_size": batch_size, "grad_accum": grad_accum, "max_steps": STEPS,
                  "output_dir": str(tmp_path / "pt"), "report": False, "progress": False, "seed": SEED,
                  **(train_extra or {})},
    })
    train(cfg)
    return [json.loads(line) for line in (tmp_path / "pt" / "metrics.jsonl").read_text().splitlines()]


KEYS = ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/margins", "rewards/accuracies")


def largest_gap(ours, theirs):
    return max(abs(a[k] - b[k]) for a, b in zip(ours, theirs) for k in KEYS)


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
    print(f"\nfirst loss preftune {ours[0]['loss']:.7f} TRL {theirs[0]['loss']:.7f}; "
          f"largest difference over {STEPS} steps: {largest_gap(ours, theirs):.1e}")


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
    print(f"\nLoRA: last loss preftune {ours[-1]['loss']:.7f} TRL {theirs[-1]['loss']:.7f}; "
          f"largest difference over {STEPS} steps: {largest_gap(ours, theirs):.1e}")


# Pairs whose chosen and rejected lengths differ a lot (5 against 28 tokens, say) and whose prompts
# do too (2 to 46 tokens): the chosen and rejected halves of a batch are padded differently, and
# per-token averages (ipo, sigmoid_norm) weigh the two responses differently.
UNEVEN = [
    {"prompt": "Q: Hi?\nA:", "chosen": " A preference pair holds a prompt, a chosen answer and a rejected "
     "answer, all as plain text.", "rejected": " No."},
    {"prompt": "Question: Direct preference optimization trains a policy against what, exactly, in the "
     "usual setup?\nAnswer:", "chosen": " 12.",
     "rejected": " The quick brown fox jumps over the lazy dog, and then it jumps again over the lazy dog."},
    {"prompt": "Numbers?", "chosen": " 12, 345 and 6789 appear in text too; so do commas, colons: and dashes -.",
     "rejected": " Seven hundred"},
    {"prompt": "Question: What is the best ice cream, in your own opinion?\nAnswer:", "chosen": " Haagen-Dazs.",
     "rejected": " GB"},
]

# Cut at max_length 20 with prompts of at most 10 tokens (2 to 10): there both tools keep the prompt
# and cut each sequence's end, the one truncation rule they share (assert_truncation_is_shared checks it).
TRUNCATED_AT = 20
TRUNCATED = [
    UNEVEN[0], UNEVEN[2],
    {"prompt": "Sum?", "chosen": " Four, of course.",
     "rejected": " Numbers like 12, 345 and 6789 appear in text too; so do commas."},
    {"prompt": "What color is the sky?", "chosen": " Blue on a clear day, and grey when it rains.",
     "rejected": " Purple."},
]


def conversation(question, chosen, rejected, system=None):
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


CONVERSATIONS = [  # rendered with the tiny tokenizer's chat template
    conversation("What is the best ice cream?", "Haagen-Dazs is rich.", "GB"),
    conversation("Name a fast animal.", "The cheetah.", "A snail, I think.", system="Be brief."),
    conversation("Hi.", "Hello, how can I help you today?", "No."),
    conversation("What color is the sky?", "Blue on a clear day.", "Purple, probably."),
]
# The same, the prompt left implicit: the messages chosen and rejected share.
IMPLICIT_CONVERSATIONS = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                          for r in CONVERSATIONS]

# TRL 1.16's `sigmoid` ignores label_smoothing, so preftune's conservative DPO (cDPO) is checked
# through an identity: with S(h) = -log sigmoid(beta h), which satisfies S(-h) = S(h) + beta h,
#   cDPO_eps   = (1 - eps) S(h) + eps S(-h)                    = S(h) + eps beta h
#   robust_eps = ((1 - eps) S(h) - eps S(-h)) / (1 - 2 eps)   = S(h) - eps beta h / (1 - 2 eps)
# so cDPO_eps = (2 - 2 eps) sigmoid - (1 - 2 eps) robust_eps: a weighted loss TRL runs.
EPS = 0.2
CDPO = {"type": "sigmoid", "label_smoothing": EPS}
CDPO_AS_TRL = {"type": ["sigmoid", "robust"], "weights": [2 - 2 * EPS, -(1 - 2 * EPS)], "label_smoothing": EPS}

# Chosen responses of one length (7 tokens with EOS), rejected ones of others: TRL's sft averages
# over the micro-batch's chosen tokens, preftune's per response, which then agree.
SAME_LENGTH_CHOSEN = [dict(row, chosen=chosen) for row, chosen in zip(
    PAIRS, [" Haagen-Dazs ice cream.", " The quick brown fox.", " It is 4.", " Blue."])]

LD = {"ld_alpha": 0.3}
WPO = {"wpo_weighting": True}

# Each case: keyword arguments for both runs, then extra ones for preftune's and for TRL's.
CASES = {
    # 1. the losses both implement with the same meaning
    "cdpo": ({"rows": UNEVEN}, {"loss": CDPO}, {"loss": CDPO_AS_TRL}),
    "robust": ({"rows": UNEVEN, "loss": {"type": "robust", "label_smoothing": EPS}}, {}, {}),
    "hinge": ({"rows": UNEVEN, "loss": {"type": "hinge"}}, {}, {}),
    # preftune's default ipo_length_normalize: TRL averages IPO's log-ratios per token
    "ipo": ({"rows": UNEVEN, "loss": {"type": "ipo"}}, {}, {}),
    "sigmoid_norm": ({"rows": UNEVEN, "loss": {"type": "sigmoid_norm"}}, {}, {}),
    "sigmoid+ipo weighted": ({"rows": UNEVEN, "loss": {"type": ["sigmoid", "ipo"], "weights": [0.7, 0.3]}},
                             {}, {}),
    # 2. conversational data and a chat template
    "conversational": ({"rows": CONVERSATIONS}, {}, {}),
    "conversational, implicit prompt": ({"rows": IMPLICIT_CONVERSATIONS}, {}, {}),
    # 3. chosen and rejected of quite different lengths, in each of preftune's batch layouts:
    # prompt shared (the default on CPU), padded (on GPUs), packed into one row
    "uneven lengths": ({"rows": UNEVEN}, {"data": {"share_prompt": True}}, {}),
    "uneven lengths, padded": ({"rows": UNEVEN}, {"data": {"share_prompt": False}}, {}),
    "uneven lengths, packed": ({"rows": UNEVEN}, {"data": {"share_prompt": False, "packing": "on"}}, {}),
    # 4. truncation where both tools truncate alike
    "truncation": ({"rows": TRUNCATED, "max_length": TRUNCATED_AT}, {}, {}),
    # 5. two micro-batches of two pairs per step on both sides. Adam with a large eps and no
    # clipping: its step then follows the gradient's scale, so a step that scales its gradient by
    # the number of micro-batches (dividing each by its own pairs) shows.
    "gradient accumulation": ({"rows": UNEVEN, "batch_size": 2, "grad_accum": 2, "adam_eps": 1.0,
                               "max_grad_norm": None, "lr": 1e-2}, {}, {}),
    # 6. reference log-probs computed before training against TRL's live reference
    "precomputed reference": ({"rows": UNEVEN}, {"reference": "precompute"}, {}),
    # Text responses that already end with the EOS token's text: neither appends a second EOS.
    "responses ending in EOS": ({"rows": [dict(r, chosen=r["chosen"] + EOS) for r in PAIRS]}, {}, {}),
    # 7. the losses of TRL's that preftune added later. aot and aot_unpaired sort over the step's
    # four pairs, one micro-batch on both sides.
    **{name: ({"rows": UNEVEN, "loss": loss}, {}, {}) for name, loss in {
        "exo_pair": {"type": "exo_pair", "label_smoothing": 1e-3},
        "nca_pair": {"type": "nca_pair"},
        "sppo_hard": {"type": "sppo_hard"},
        "apo_zero": {"type": "apo_zero"},
        "apo_down": {"type": "apo_down"},
        "discopop": {"type": "discopop", "discopop_tau": 0.1},
        "aot": {"type": "aot", "label_smoothing": 0.1},
        "aot_unpaired": {"type": "aot_unpaired"},
        # f-DPO's divergences, where TRL defines them. (At beta 1, forward KL's 1 - 1/u multiplies the
        # tools' float32 differences in log-probs by 1/u, past the tolerance: beta stays 0.1.)
        "sigmoid, forward_kl": {"type": "sigmoid", "f_divergence_type": "forward_kl"},
        "sigmoid, js_divergence": {"type": "sigmoid", "f_divergence_type": "js_divergence"},
        "sigmoid, alpha_divergence": {"type": "sigmoid", "f_divergence_type": "alpha_divergence",
                                      "f_alpha_divergence_coef": 0.3},
        "ipo, forward_kl": {"type": "ipo", "f_divergence_type": "forward_kl"},
        "sigmoid_norm + hinge, alpha_divergence": {"type": ["sigmoid_norm", "hinge"], "weights": [0.6, 0.4],
                                                   "f_divergence_type": "alpha_divergence"},
        "exo_pair + discopop, js_divergence": {"type": ["exo_pair", "discopop"], "label_smoothing": 1e-3,
                                               "f_divergence_type": "js_divergence"},
    }.items()},
    # sft, alone and as RPO's NLL term (TRL's old rpo_alpha: [sigmoid, sft] weighted [1, alpha])
    "sft": ({"rows": SAME_LENGTH_CHOSEN, "loss": {"type": "sft"}}, {}, {}),
    "sigmoid + sft (rpo_alpha)": ({"rows": SAME_LENGTH_CHOSEN, "loss": {"type": ["sigmoid", "sft"],
                                                                       "weights": [1.0, 0.5]}}, {}, {}),
    # 8. LD-DPO (ld_alpha) and WPO (wpo_weighting, TRL's use_weighting), in each batch layout, with
    # both tools precomputing the reference, and beside per-token averages (ipo) and accumulation.
    **{f"{name}{layout}": ({"rows": UNEVEN, "loss": loss}, {"data": data} if data else {}, {})
       for name, loss in {"ld_alpha": LD, "wpo": WPO, "ld_alpha + wpo": {**LD, **WPO}}.items()
       for layout, data in {"": None, ", padded": {"share_prompt": False},
                            ", packed": {"share_prompt": False, "packing": "on"}}.items()},
    "ld_alpha + wpo, precomputed reference": ({"rows": UNEVEN, "loss": {**LD, **WPO}}, {"reference": "precompute"},
                                              {"precompute": True}),
    "ipo, ld_alpha + wpo": ({"rows": UNEVEN, "loss": {"type": "ipo", **LD, **WPO}}, {}, {}),
    "ld_alpha 0 + wpo, gradient accumulation": ({"rows": UNEVEN, "loss": {"ld_alpha": 0.0, **WPO}, "batch_size": 2,
                                                 "grad_accum": 2, "adam_eps": 1.0, "max_grad_norm": None,
                                                 "lr": 1e-2}, {}, {}),
}


@pytest.mark.slow
@pytest.mark.filterwarnings("error:data.packing")  # the packed case must pack, not fall back
@pytest.mark.parametrize("case", list(CASES))
def test_matches_trl(case, tmp_path, tiny_model_factory):
    both, ours_only, theirs_only = CASES[case]
    policy_dir = tiny_model_factory("qwen2", seed=0)
    reference_dir = tiny_model_factory("qwen2", seed=1)
    if "max_length" in both:
        assert_truncation_is_shared(policy_dir, both["rows"], both["max_length"])
    if "sft" in both.get("loss", {}).get("type", ""):
        assert_chosen_lengths_are_equal(policy_dir, both["rows"])
    ours = run_preftune(policy_dir, reference_dir, tmp_path, **both, **ours_only)
    theirs = run_trl(policy_dir, reference_dir, tmp_path, **both, **theirs_only)
    assert_steps_match(ours, theirs)
    print(f"\n{case}: largest difference over {STEPS} steps: {largest_gap(ours, theirs):.1e}")


@pytest.mark.slow
def test_lora_with_ld_alpha_and_wpo_matches_trl(tmp_path, tiny_model_factory):
    """LD-DPO on the reference that is the base with adapters off, WPO's weights from the adapted policy."""
    pytest.importorskip("peft")
    policy_dir = tiny_model_factory("qwen2", seed=0)
    loss = {**LD, **WPO}
    ours = run_preftune(policy_dir, None, tmp_path, lora=LORA, lr=1e-2, rows=UNEVEN, loss=loss)
    theirs = run_trl(policy_dir, None, tmp_path, lora=LORA, lr=1e-2, rows=UNEVEN, loss=loss)
    assert ours[-1]["loss"] < 0.9 * ours[0]["loss"]  # the adapters learned something: later steps test them
    assert_steps_match(ours, theirs)


def assert_truncation_is_shared(policy_dir, rows, max_length):
    """Some pairs are cut, and every prompt fits in preftune's prompt budget (half of max_length),
    so preftune, like TRL's keep_start, cuts completions and never the prompt."""
    from transformers import AutoTokenizer

    from preftune.data.schema import PreferencePair
    from preftune.data.tokenize import tokenize_pair

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    pairs = [tokenize_pair(PreferencePair(r["prompt"], r["chosen"], r["rejected"]), tokenizer) for r in rows]
    assert sum(p.length > max_length for p in pairs) >= 3
    assert all(len(p.prompt_ids) <= max_length // 2 for p in pairs)


def assert_chosen_lengths_are_equal(policy_dir, rows):
    """sft's per-response mean (preftune) equals its per-token mean over the batch (TRL)."""
    from transformers import AutoTokenizer

    from preftune.data.schema import PreferencePair
    from preftune.data.tokenize import tokenize_pair

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    pairs = [tokenize_pair(PreferencePair(r["prompt"], r["chosen"], r["rejected"]), tokenizer) for r in rows]
    assert len({len(p.chosen_ids) for p in pairs}) == 1 < len({len(p.rejected_ids) for p in pairs})


TOKEN_METRICS = ("entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected")


@pytest.mark.slow
@pytest.mark.parametrize("data", [{"share_prompt": True}, {"share_prompt": False, "packing": "on"}],
                         ids=["prompt shared", "packed"])
def test_token_metrics_match_trl(data, tmp_path, tiny_model_factory):
    """train.token_metrics logs TRL's entropy, mean_token_accuracy and logits/* with TRL's values:
    per completion token, over the step's tokens (one micro-batch a step on both sides)."""
    policy_dir = tiny_model_factory("qwen2", seed=0)
    reference_dir = tiny_model_factory("qwen2", seed=1)
    ours = run_preftune(policy_dir, reference_dir, tmp_path, rows=UNEVEN, data=data, loss=WPO,
                        train_extra={"token_metrics": True})
    theirs = run_trl(policy_dir, reference_dir, tmp_path, rows=UNEVEN, loss=WPO)
    assert_steps_match(ours, theirs)
    assert ours[-1]["mean_token_accuracy"] > 0  # training made some chosen tokens the top choice
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        for key in TOKEN_METRICS:
            tol = 1e-5 if step == 1 else 1e-4
            assert a[key] == pytest.approx(b[key], abs=tol, rel=tol), (step, key, a[key], b[key])
    print("\n" + "\n".join(f"{k}: {[round(a[k], 5) for a in ours]} TRL {[round(b[k], 5) for b in theirs]}"
                             for k in TOKEN_METRICS))


def test_trl_keep_start_is_a_prompt_budget_of_max_length_less_one(tiny_model_factory):
    """What the config tells a user of TRL's truncation_mode: its keep_start (the default) is
    data.max_prompt_length: max_length - 1, not data.truncation: keep_start. Prompts longer than half
    of max_length, where preftune's default budget would shorten them, are cut alike: completions
    only, from their end; a prompt that fills max_length is dropped by both."""
    from transformers import AutoTokenizer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from preftune.data.schema import PreferencePair
    from preftune.data.tokenize import tokenize_pair, truncate_pair

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_factory("qwen2", seed=0))
    max_length = 34  # UNEVEN's prompts: 9, 46, 2 and 32 tokens
    pairs = [tokenize_pair(PreferencePair(r["prompt"], r["chosen"], r["rejected"]), tokenizer) for r in UNEVEN]
    assert any(max_length // 2 < len(p.prompt_ids) < max_length < p.length for p in pairs)
    assert any(len(p.prompt_ids) >= max_length for p in pairs)
    collate = DataCollatorForPreference(pad_token_id=0, max_length=max_length, truncation_mode="keep_start")
    for pair in pairs:
        ours, _ = truncate_pair(pair, max_length, max_length - 1, "keep_end")
        if len(pair.prompt_ids) >= max_length:  # TRL's _prepare_dataset filters these out
            assert ours is None
            continue
        batch = collate([{"prompt_ids": pair.prompt_ids, "chosen_ids": pair.chosen_ids,
                          "rejected_ids": pair.rejected_ids}])
        theirs = [ids[mask == 1].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
        assert [ours.prompt_ids + ours.chosen_ids, ours.prompt_ids + ours.rejected_ids] == theirs
        # Under preftune's keep_start, the name TRL uses, the prompt's end would go instead.
        if len(pair.prompt_ids) > max_length // 2 and pair.length > max_length:
            assert truncate_pair(pair, max_length, None, "keep_start")[0].prompt_ids != pair.prompt_ids


def trl_tokenized(rows, tokenizer):
    """TRL's own preprocessing of `rows` (DPOTrainer._prepare_dataset: extract_prompt where no
    prompt is given, EOS after text responses, the prompt ids up to where prompt + response part)."""
    import types

    import datasets
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir="unused", use_cpu=True, report_to=[], max_length=None, bf16=False)
    trainer = types.SimpleNamespace(_tokenizer=tokenizer)
    dataset = DPOTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(rows), tokenizer, args, "train")
    return [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in dataset]


def preftune_tokenized(rows, tokenizer):
    from preftune.data.io import parse_rows
    from preftune.data.tokenize import tokenize_pair

    pairs = parse_rows([(f"row {i}", row) for i, row in enumerate(rows)], "rows").pairs
    return [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in (tokenize_pair(q, tokenizer) for q in pairs)]


# Text rows whose responses part between words: after a space, a newline, or at once after the
# prompt's last character ("A:Blue"), where cutting back to the last whitespace made "\nA:" part of
# both responses.
BETWEEN_WORDS = [
    {"prompt": "Question: What color is the sky?\nAnswer:", "chosen": " Blue.", "rejected": " Purple."},
    {"prompt": "Q: sky?\nA:", "chosen": "Blue.", "rejected": "Purple."},
    {"prompt": "Q: sky?\n", "chosen": "Blue.", "rejected": "Purple."},
    {"prompt": "Q: sky?\n\n", "chosen": "Blue on a clear day.", "rejected": "Purple."},
    {"prompt": "Numbers: 12,", "chosen": "345.", "rejected": " six."},
]


@pytest.mark.parametrize("layout", ["text", "conversational"])
def test_each_trl_data_format_splits_prompt_and_responses_where_trl_does(layout, tiny_model_factory):
    """Explicit and implicit prompts (chosen and rejected only) give TRL's token ids: the same
    prompt, so the same responses, so the same loss, whatever the loss type."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_factory("qwen2", seed=0))
    explicit = BETWEEN_WORDS + PAIRS if layout == "text" else CONVERSATIONS
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in explicit]
    for rows in (explicit, implicit):
        assert preftune_tokenized(rows, tokenizer) == trl_tokenized(rows, tokenizer)


def test_an_implicit_text_prompt_parting_mid_word_ends_before_the_word(tiny_model_factory):
    """The one split that differs, on purpose: responses that part mid-word ("Hel|lo", "Hel|p")
    start at the word here, as the model would generate it; TRL's prompt ends at the differing
    character. The token sequences are the same, but the response tokens are not: log-probs
    differ, and so do the losses that read a response's own log-ratio or length (all but the
    margin-only ones: sigmoid, hinge, robust, exo_pair, discopop and aot)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_factory("qwen2", seed=0))
    rows = [{"chosen": "Say hi: Hello there.", "rejected": "Say hi: Help me."}]
    (prompt, chosen, rejected), = preftune_tokenized(rows, tokenizer)
    (trl_prompt, trl_chosen, trl_rejected), = trl_tokenized(rows, tokenizer)
    assert tokenizer.decode(prompt) == "Say hi:" and tokenizer.decode(chosen).startswith(" Hello")
    assert tokenizer.decode(trl_prompt).startswith("Say hi: Hel") and len(trl_prompt) > len(prompt)
    assert prompt + chosen == trl_prompt + trl_chosen and prompt + rejected == trl_prompt + trl_rejected


# A template that reads TRL's per-row template arguments: the `tools` column and a
# `chat_template_kwargs` entry (`brief`, standing for the like of Qwen3's enable_thinking).
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>\nTools: {{ tools | tojson }}<|eos|>\n{% endif %}"
    "{% if brief %}<|system|>\nBe brief.<|eos|>\n{% endif %}"
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|eos|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}


def test_tools_and_chat_template_kwargs_of_a_row_reach_the_template_as_in_trl(tiny_model_factory):
    """A tool-use data set's `tools` column (a list, or JSON text of one) and a row's
    `chat_template_kwargs` are rendered into the prompt, as TRL renders them; kept as metadata,
    they trained on a prompt without the tools the responses call."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_factory("qwen2", seed=0))
    tokenizer.chat_template = TOOLS_TEMPLATE
    rows = [dict(CONVERSATIONS[0], tools=[WEATHER]), dict(CONVERSATIONS[1], tools=json.dumps([WEATHER])),
            dict(CONVERSATIONS[2], tools=[WEATHER], chat_template_kwargs={"brief": True})]
    ours = preftune_tokenized(rows, tokenizer)
    assert ours == [trl_tokenized([row], tokenizer)[0] for row in rows]  # one column type per data set
    assert "Tools:" in tokenizer.decode(ours[1][0]) and "Be brief." in tokenizer.decode(ours[2][0])
