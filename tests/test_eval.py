"""`preftune eval pairs | generate | score-human` end to end on tiny models built in-process.

The reward functions are files written by the tests. A "rigged" reward looks responses up in a
table the test fills with texts it sampled itself, so the expected winner is known in advance.
"""

import json
import math
import re
import shutil
import warnings

import pytest
import torch
import yaml
from preftune_test_data import count_reward_model_passes, save_reward_model
from typer.testing import CliRunner

from preftune.bradley_terry import win_rate
from preftune.data.io import load_pairs
from preftune.data.tokenize import tokenize_pair
from preftune.demo.tiny import save_tiny_model
from preftune.errors import UserError
from preftune.eval_cli import app
from preftune.eval_generate import compare_models
from preftune.evaluate import write_eval_record
from preftune.labeling.pairs import Pair
from preftune.labeling.store import Store
from preftune.logprobs import naive_completion_logps
from preftune.records import read_records
from preftune.report import load_evals
from preftune.sampling import (
    SamplingSettings,
    generate_token_ids,
    load_model_and_tokenizer,
    sample_pairs,
)

torch.set_num_threads(2)

PROMPTS = ["The quick brown fox", "What is the best ice cream?", "A preference pair holds",
           "hello"]
MAX_NEW = 6
GENERATE_KEYS = {  # docs/CONTRACTS.md, eval.json of kind "generate"
    "kind", "model", "reference", "judge", "n_prompts", "win_rate", "win_rate_ci", "ties",
    "mean_reward", "kl", "kl_se", "kl_tokens", "kl_tokens_se", "mean_length",
}
ROW_KEYS = {"pair_id", "prompt_index", "prompt", "responses", "order", "reward", "winner",
            "logps", "kl", "kl_tokens", "length"}
PAIRS_METRICS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                 "rewards/margins", "logps/chosen", "logps/rejected", "lengths/chosen",
                 "lengths/rejected"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {name: save_tiny_model(root / name, hidden_size=32, seed=seed)
            for name, seed in (("ref", 0), ("pol", 1), ("pol2", 2))}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def own_texts(models):
    """What each model writes on PROMPTS with the evaluator's settings, sampled independently."""
    texts = {}
    for name, path in models.items():
        model, tokenizer = load_model_and_tokenizer(str(path))
        records = sample_pairs(model, tokenizer, PROMPTS, n=1, max_new_tokens=MAX_NEW, seed=0)
        texts[name] = [r["responses"][0] for r in records]
    for i in range(len(PROMPTS)):  # the rigged tests below mean something only if texts differ
        assert len({texts[name][i] for name in texts}) == len(texts)
    return texts


def rigged_reward(tmp_path, scores: dict[str, float]) -> str:
    """A reward file giving each listed text its score and every other text 0."""
    (tmp_path / "favoured.json").write_text(json.dumps(scores), encoding="utf-8")
    (tmp_path / "rigged.py").write_text(
        "import json, pathlib\n"
        "TABLE = json.loads((pathlib.Path(__file__).parent / 'favoured.json').read_text())\n"
        "def reward(prompt: str, response: str) -> float:\n"
        "    return float(TABLE.get(response, 0.0))\n"
        "def length(prompt: str, response: str) -> float:\n"
        "    return float(len(response))\n",
        encoding="utf-8",
    )
    return f"reward:{tmp_path / 'rigged.py'}:reward"


def invoke(args):
    """Run `preftune eval ...` through the eval sub-app.

    Importing `preftune.cli` here would wrap every sub-app's commands in place (its friendly
    error printer), which changes what other test files see, so the sub-app is used directly.
    """
    result = CliRunner().invoke(app, [*map(str, args)])
    if result.exception and not isinstance(result.exception, (SystemExit, UserError)):
        raise result.exception
    return result


def user_error(result) -> str:
    """The sentence of a UserError, raised (bare sub-app) or printed with status 2 (wrapped)."""
    if isinstance(result.exception, UserError):
        return str(result.exception)
    assert result.exit_code == 2 and result.output.startswith("error:"), result.output
    return result.output


# ------------------------------------------------------------------ eval pairs


def write_pairs(path):
    rows = [
        {"prompt": "The quick brown fox", "chosen": " jumps over the lazy dog.", "rejected": " is lazy."},
        {"prompt": "What is the best ice cream?", "chosen": " Haagen-Dazs is rich.", "rejected": " Numbers."},
        {"prompt": "hello,", "chosen": " how can I help you today?", "rejected": " no."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_eval_pairs_with_a_reference_of_another_tokenizer_is_one_sentence(models, tmp_path):
    # It once ended in "IndexError: index out of range in self" (a smaller vocabulary).
    other = save_tiny_model(tmp_path / "other", "llama", texts=["a different corpus makes a smaller vocabulary"],
                            vocab_size=300)
    result = invoke(["pairs", "--model", models["ref"], "--reference", other,
                     "--data", write_pairs(tmp_path / "D_eval.jsonl"), "--out", tmp_path / "out"])
    assert f"the reference '{other}' (--reference) has another tokenizer than the policy" in user_error(result)
    assert not (tmp_path / "out" / "eval.json").exists()


def test_eval_pairs_names_its_own_option_for_a_missing_data_file(models, tmp_path):
    """It said 'check data.train / data.eval', settings of training, not of this command."""
    message = user_error(invoke(["pairs", "--model", models["ref"], "--reference", models["ref"],
                                 "--data", tmp_path / "nope.jsonl"]))
    assert message.rstrip().endswith("does not exist; check --data.")


def test_eval_pairs_policy_equal_to_reference_has_zero_margins(models, tmp_path):
    data = write_pairs(tmp_path / "D_eval.jsonl")
    result = invoke(["pairs", "--model", models["ref"], "--reference", models["ref"],
                     "--data", data, "--beta", "0.1", "--out", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert record["kind"] == "pairs" and record["n_pairs"] == 3
    assert {f"eval/{k}" for k in PAIRS_METRICS} <= set(record)
    assert record["eval/rewards/accuracies"] == 0.0  # chosen > rejected never holds at equality
    assert record["eval/rewards/margins"] == 0.0
    assert record["eval/rewards/chosen"] == 0.0
    assert record["eval/loss"] == pytest.approx(math.log(2))  # DPO's loss at initialisation
    assert record["eval/logps/chosen"] < 0 and record["eval/lengths/chosen"] > 1
    assert record["truncated"] == 0 and record["skipped"] == {}


def test_eval_pairs_reads_the_split_asked_for_and_keeps_one_record_per_split(models, tmp_path):
    import datasets

    rows = [json.loads(line) for line in write_pairs(tmp_path / "D.jsonl").read_text().splitlines()]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dd"))
    for split, said in (("test", "1 pair, beta"), ("train", "3 pairs, beta")):
        result = invoke(["pairs", "--model", models["ref"], "--reference", models["ref"],
                         "--data", tmp_path / "dd", "--split", split, "--out", tmp_path / "out"])
        assert result.exit_code == 0, result.output
        assert said in result.output  # not "1 pairs"
    records = json.loads((tmp_path / "out" / "eval.json").read_text())["evals"]
    assert [(r["split"], r["n_pairs"]) for r in records] == [("test", 1), ("train", 3)]


def test_eval_pairs_reads_the_config_data_config_names_and_keeps_one_record_per_config(models, tmp_path):
    from preftune_test_data import write_multi_config_folder

    repo = write_multi_config_folder(tmp_path / "repo")
    for config, said in (("en", "2 pairs, beta"), ("de", "1 pair, beta")):
        result = invoke(["pairs", "--model", models["ref"], "--reference", models["ref"],
                         "--data", repo, "--data-config", config, "--out", tmp_path / "out"])
        assert result.exit_code == 0, result.output
        assert said in result.output
    records = json.loads((tmp_path / "out" / "eval.json").read_text())["evals"]
    assert [(r["data_config"], r["n_pairs"]) for r in records] == [("en", 2), ("de", 1)]
    result = invoke(["pairs", "--model", models["ref"], "--reference", models["ref"], "--data", repo,
                     "--out", tmp_path / "out"])
    assert str(result.exception).endswith("'de', 'en', and none is its default; choose one with --data-config.")


def test_eval_pairs_counts_truncated_pairs_apart_from_skipped_ones(models, tmp_path):
    # Truncated pairs are evaluated, cut to --max-length; calling them skipped misleads.
    data = write_pairs(tmp_path / "D_eval.jsonl")
    with data.open("a") as f:  # a pair the loader leaves out
        f.write(json.dumps({"prompt": "hi", "chosen": " same", "rejected": " same"}) + "\n")
    result = invoke(["pairs", "--model", models["ref"], "--reference", models["ref"], "--data", data,
                     "--max-length", "12", "--out", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert record["truncated"] > 0 and "truncated" not in record["skipped"]
    assert record["n_pairs"] + sum(record["skipped"].values()) == 4
    # The printout said only "N pairs": left-out and cut pairs were in eval.json alone.
    assert "left out (not evaluated): " in result.output and "chosen == rejected 1" in result.output
    assert f"{record['truncated']} cut to max_length (evaluated as cut)" in result.output


def test_eval_pairs_matches_a_direct_computation_and_reads_the_run_config(models, tmp_path):
    """RUN/final without --reference/--beta takes both from RUN/config.yaml; the numbers equal
    beta * (log pi - log ref) computed here with the naive full-vocabulary log-probs."""
    run = tmp_path / "run"
    shutil.copytree(models["pol"], run / "final")
    config = {"model": {"path": str(models["ref"])}, "data": {"train": "x.jsonl"},
              "loss": {"type": "sigmoid", "beta": 0.5}}
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    data = write_pairs(tmp_path / "D_eval.jsonl")
    result = invoke(["pairs", "--model", run / "final", "--data", data])
    assert result.exit_code == 0, result.output
    record = json.loads((run / "final" / "eval.json").read_text())
    assert record["beta"] == 0.5 and record["reference"] == str(models["ref"])

    policy, tokenizer = load_model_and_tokenizer(str(models["pol"]))
    reference, _ = load_model_and_tokenizer(str(models["ref"]))
    chosen, margins = [], []
    for pair in load_pairs(str(data)).pairs:
        tokenized = tokenize_pair(pair, tokenizer)
        rewards = []
        for completion in (tokenized.chosen_ids, tokenized.rejected_ids):
            ids = torch.tensor([tokenized.prompt_ids + completion], device=policy.device)
            mask = torch.tensor([[0] * len(tokenized.prompt_ids) + [1] * len(completion)],
                                device=policy.device)
            with torch.no_grad():
                pi = naive_completion_logps(policy, ids, torch.ones_like(ids), mask)[0]
                ref = naive_completion_logps(reference, ids, torch.ones_like(ids), mask)[0]
            rewards.append(0.5 * float(pi - ref))
        chosen.append(rewards[0])
        margins.append(rewards[0] - rewards[1])
    assert record["eval/rewards/chosen"] == pytest.approx(sum(chosen) / 3, abs=1e-4)
    assert record["eval/rewards/margins"] == pytest.approx(sum(margins) / 3, abs=1e-4)
    assert record["eval/rewards/accuracies"] == sum(m > 0 for m in margins) / 3


def test_eval_pairs_means_are_over_pairs_with_a_short_last_batch_and_ties_count_as_wrong():
    """5 pairs in batches of 2, 2 and 1: every number is a mean over the 5 pairs, not a mean of
    the 3 batch means (the accuracy would read 1/3, not 2/5), padding never enters a sum, and a
    pair whose margin is exactly 0 counts as wrong. Per-token log-probs are chosen to be exact
    in binary: policy -t/4 - 1/2, reference -t/8 - 1, so each token's log-ratio is 1/2 - t/8."""
    from preftune.config import validate_config
    from preftune.data.tokenize import TokenizedPair
    from preftune.evaluate import evaluate_pairs

    def summed(per_token):
        def logps(input_ids, completion_mask):  # (2B, T) -> (2B,), padding (id 99) masked out
            return torch.where(completion_mask.bool(), per_token(input_ids.double()), 0.0).sum(1)
        return logps

    policy, reference = summed(lambda t: -t / 4 - 0.5), summed(lambda t: -t / 8 - 1.0)

    def policy_logps(input_ids, attention_mask, completion_mask, *rest):
        return policy(input_ids, completion_mask), completion_mask.sum(1)

    pairs = [TokenizedPair([1, 2], [3], [7, 7], index=0),  # log-ratios 1/8, -3/4: margin 7/8
             TokenizedPair([1], [6, 6, 6], [2], index=1),  # -3/4, 1/4: -1
             TokenizedPair([4, 4, 4], [2, 6], [4], index=2),  # 0, 0: a tie
             TokenizedPair([2], [1], [9, 9], index=3),  # 3/8, -5/4: 13/8
             TokenizedPair([3], [8, 8, 8, 8], [1], index=4)]  # -2, 3/8: -19/8, alone in the last batch
    config = validate_config({"model": {"path": "x"}, "data": {"train": "x.jsonl"},
                              "loss": {"type": "sigmoid", "beta": 0.5}})
    got = evaluate_pairs(policy_logps, lambda batch: reference(batch.input_ids, batch.completion_mask),
                         pairs, config, "cpu", pad_token_id=99, batch_size=2)
    margins = [7 / 8, -1, 0, 13 / 8, -19 / 8]  # of log-ratios; the rewards are beta = 1/2 times them
    expected = {
        "loss": sum(math.log1p(math.exp(-0.5 * m)) for m in margins) / 5,
        "rewards/chosen": 0.5 * (1 / 8 - 3 / 4 + 0 + 3 / 8 - 2) / 5,  # -0.225
        "rewards/rejected": 0.5 * (-3 / 4 + 1 / 4 + 0 - 5 / 4 + 3 / 8) / 5,  # -0.1375
        "rewards/margins": 0.5 * sum(margins) / 5,  # -0.0875
        "rewards/accuracies": 2 / 5,  # pairs 0 and 3; the tie is wrong
        "logps/chosen": (-1.25 - 6 - 3 - 0.75 - 10) / 5,  # policy sums of -t/4 - 1/2
        "logps/rejected": (-4.5 - 1 - 1.5 - 5.5 - 0.75) / 5,
        "lengths/chosen": (1 + 3 + 2 + 1 + 4) / 5,
        "lengths/rejected": (2 + 1 + 1 + 2 + 1) / 5,
    }
    assert got == pytest.approx(expected, abs=1e-12)


def write_run(tmp_path, policy, config: dict):
    run = tmp_path / "run"
    shutil.copytree(policy, run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return run


@pytest.mark.parametrize("model_section, loss_section", [
    ({"reference": "copy"}, {"type": "sigmoid", "beta": 0.5, "reference_free": True}),
    ({"reference": "none"}, {"type": "simpo", "beta": 0.5}),
])
def test_eval_pairs_scores_a_run_trained_without_a_reference_without_one(models, tmp_path, model_section,
                                                                          loss_section):
    """Training logs eval/ rewards of a reference-free run as beta * log pi (no reference is
    loaded); `eval pairs` on its final model reports the same, not beta * log(pi / pi_start)."""
    run = write_run(tmp_path, models["pol"], {"model": {"path": str(models["ref"]), **model_section},
                                              "data": {"train": "x.jsonl"}, "loss": loss_section})
    result = invoke(["pairs", "--model", run / "final", "--data", write_pairs(tmp_path / "d.jsonl")])
    assert result.exit_code == 0, result.output
    record = json.loads((run / "final" / "eval.json").read_text())
    assert record["reference"] is None
    assert record["eval/rewards/chosen"] == pytest.approx(0.5 * record["eval/logps/chosen"], rel=1e-6)
    assert record["eval/rewards/rejected"] == pytest.approx(0.5 * record["eval/logps/rejected"], rel=1e-6)
    if loss_section.get("reference_free"):  # a reference would change the loss itself: refused
        result = invoke(["pairs", "--model", run / "final", "--reference", models["ref"],
                         "--data", tmp_path / "d.jsonl"])
        assert "reference_free" in user_error(result)


def test_eval_pairs_with_another_loss_leaves_out_the_run_settings_it_does_not_use(models, tmp_path):
    """--loss ipo on a cDPO run: the run's label_smoothing (which IPO would refuse) is left out,
    its beta kept; the loss is IPO's (h - 1/(2 beta))^2, 1 at policy = reference and beta 0.5."""
    run = write_run(tmp_path, models["ref"], {"model": {"path": str(models["ref"])}, "data": {"train": "x.jsonl"},
                                              "loss": {"type": "sigmoid", "beta": 0.5, "label_smoothing": 0.2}})
    result = invoke(["pairs", "--model", run / "final", "--data", write_pairs(tmp_path / "d.jsonl"),
                     "--loss", "ipo"])
    assert result.exit_code == 0, result.output
    record = json.loads((run / "final" / "eval.json").read_text())
    assert record["loss_type"] == "ipo" and record["beta"] == 0.5
    assert record["eval/loss"] == pytest.approx(1.0)


@pytest.mark.parametrize("precision", [{"dtype": "bfloat16"}, {"autocast": "bfloat16"}])
def test_eval_pairs_on_a_run_in_bf16_gives_the_eval_numbers_it_logged(models, tmp_path, precision):
    """A run in bf16 weights or under bf16 autocast: `eval pairs` on RUN/final, with no option,
    computes as the run did and reproduces its last eval/ line exactly (float32 differs by 1e-5)."""
    import preftune

    data = write_pairs(tmp_path / "D_eval.jsonl")
    run = tmp_path / "run"
    preftune.train({"model": {"path": str(models["ref"]), **precision},
                    "data": {"train": str(write_pairs(tmp_path / "D.jsonl")), "eval": str(data)},
                    "loss": {"type": "sigmoid", "beta": 0.1}, "optim": {"lr": 1e-2},
                    "train": {"batch_size": 3, "max_steps": 1, "eval_every": 1, "output_dir": str(run),
                              "progress": False, "report": False}})
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in logged if "eval/loss" in line][-1]
    result = invoke(["pairs", "--model", run / "final", "--data", data])
    assert result.exit_code == 0, result.output
    record = json.loads((run / "final" / "eval.json").read_text())
    for key in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert record[f"eval/{key}"] == logged[f"eval/{key}"], key


@pytest.mark.parametrize("train_section, extra, expected", [
    ({"batch_size": 2}, [], 2),
    ({"batch_size": 2, "eval_batch_size": 4}, [], 4),
    ({}, [], 8),
    ({"batch_size": 2}, ["--batch-size", "6"], 6),
])
def test_eval_pairs_evaluates_in_the_run_s_batches(models, tmp_path, monkeypatch, train_section, extra, expected):
    """aot's eval/ loss sorts margins within each evaluation batch (train.eval_batch_size, else
    train.batch_size). `eval pairs` always took 8 pairs a batch, so on a run that evaluated 2 at a
    time its loss was not the run's eval/loss it is named after."""
    import preftune.evaluate

    run = write_run(tmp_path, models["pol"], {"model": {"path": str(models["ref"])}, "data": {"train": "x.jsonl"},
                                              "loss": {"type": "aot"}, "train": train_section})
    used = []
    build = preftune.evaluate.pairs_eval_config
    monkeypatch.setattr(preftune.evaluate, "pairs_eval_config",
                        lambda *args, **kwargs: used.append(build(*args, **kwargs)) or used[-1])
    result = invoke(["pairs", "--model", run / "final", "--data", write_pairs(tmp_path / "d.jsonl"), *extra])
    assert result.exit_code == 0, result.output
    assert used[0].train.eval_batch_size == expected


def test_eval_pairs_naming_the_run_loss_again_keeps_its_weights(models, tmp_path):
    """--loss sigmoid,sft on an RPO run ([sigmoid, sft] weighted 1, 0.25) is the run's loss: its
    weights stay (another list of types drops them, as they belonged to the run's types)."""
    run = write_run(tmp_path, models["pol"], {"model": {"path": str(models["ref"])}, "data": {"train": "x.jsonl"},
                                              "loss": {"type": ["sigmoid", "sft"], "weights": [1.0, 0.25]}})
    data = write_pairs(tmp_path / "d.jsonl")
    losses = []
    for extra in ([], ["--loss", "sigmoid,sft"], ["--loss", "sigmoid"]):
        result = invoke(["pairs", "--model", run / "final", "--data", data, "--out", tmp_path / "out", *extra])
        assert result.exit_code == 0, result.output
        losses.append(json.loads((tmp_path / "out" / "eval.json").read_text())["eval/loss"])
    assert losses[1] == losses[0]
    assert losses[2] < losses[0]  # the NLL term's share is gone


TOKEN_METRICS = ("entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected")


def test_eval_pairs_gives_the_token_metrics_of_a_run_trained_with_them_or_when_asked(models, tmp_path):
    """A run with train.token_metrics logged TRL's four token metrics on its eval/ lines: `eval pairs`
    on its final model records them too, the values of the policy's full logits (--no-token-metrics
    leaves them out); --token-metrics adds them for any model, and without either the record has none."""
    from test_token_metrics import direct_metrics

    data = write_pairs(tmp_path / "d.jsonl")
    section = {"model": {"path": str(models["ref"])}, "data": {"train": "x.jsonl"}}
    run = write_run(tmp_path, models["pol"], {**section, "train": {"token_metrics": True}})
    result = invoke(["pairs", "--model", run / "final", "--data", data])
    assert result.exit_code == 0, result.output
    record = json.loads((run / "final" / "eval.json").read_text())
    turned_off = invoke(["pairs", "--model", run / "final", "--data", data, "--out", tmp_path / "off",
                         "--no-token-metrics"])  # the run's setting turned off
    assert turned_off.exit_code == 0, turned_off.output
    off = json.loads((tmp_path / "off" / "eval.json").read_text())
    assert not any(f"eval/{key}" in off for key in TOKEN_METRICS) and off["eval/loss"] == record["eval/loss"]
    policy, tokenizer = load_model_and_tokenizer(str(models["pol"]))
    expected = direct_metrics(policy, [tokenize_pair(pair, tokenizer) for pair in load_pairs(str(data)).pairs])
    assert expected["entropy"] > 1 and expected["logits/chosen"] != 0  # not zeros by accident
    for key in TOKEN_METRICS:
        assert record[f"eval/{key}"] == pytest.approx(expected[key], abs=1e-5), key
        assert f"eval/{key}" in result.output

    plain = write_run(tmp_path / "plain", models["pol"], section)
    for extra, logged in (([], False), (["--token-metrics"], True)):
        result = invoke(["pairs", "--model", plain / "final", "--data", data, "--out", tmp_path / "out", *extra])
        assert result.exit_code == 0, result.output
        again = json.loads((tmp_path / "out" / "eval.json").read_text())
        assert all((f"eval/{key}" in again) == logged for key in TOKEN_METRICS), extra
    assert all(again[f"eval/{key}"] == record[f"eval/{key}"] for key in TOKEN_METRICS)  # same model, data


def test_eval_pairs_without_a_reference_is_a_user_error(models, tmp_path):
    result = invoke(["pairs", "--model", models["pol"], "--data", write_pairs(tmp_path / "d.jsonl")])
    assert "--reference" in user_error(result)


def test_eval_out_naming_a_file_is_one_sentence(models, prompts_file, tmp_path):
    """--out naming an existing file was a FileExistsError traceback from mkdir, and for eval
    generate only after all the sampling."""
    taken = tmp_path / "taken.txt"
    taken.write_text("not a folder\n")
    data = write_pairs(tmp_path / "d.jsonl")
    result = invoke(["pairs", "--model", models["pol"], "--reference", models["ref"], "--data", data,
                     "--out", taken])
    assert "taken.txt is a file; name a folder" in user_error(result)
    result = invoke(["generate", "--model", models["pol"], "--reference", models["ref"], "--prompts",
                     prompts_file, "--judge", "human", "--db", tmp_path / "e.sqlite", "--out", taken])
    assert "taken.txt is a file; name a folder" in user_error(result)
    assert not (tmp_path / "e.sqlite").exists()  # refused before anything was sampled or queued


def test_eval_pairs_max_length_zero_is_refused_not_read_as_the_default(models, tmp_path):
    """`max_length or the run's` read 0 as "not given" and evaluated at 1024 tokens."""
    from preftune.evaluate import evaluate_pairs_file

    data = write_pairs(tmp_path / "d.jsonl")
    with pytest.raises(UserError, match="--max-length"):
        evaluate_pairs_file(models["pol"], data, models["ref"], max_length=0, out=tmp_path / "o")
    result = invoke(["pairs", "--model", models["pol"], "--reference", models["ref"], "--data", data,
                     "--max-length", 0, "--out", tmp_path / "o"])
    assert result.exit_code == 2 and "--max-length" in result.output
    assert not (tmp_path / "o").exists()


def test_eval_pairs_drops_the_prompt_budget_of_an_older_run_with_no_max_length():
    """A run trained before the config refused data.max_prompt_length beside max_length: null (where
    it cut nothing) is evaluated as it trained, not refused for a key eval pairs has no option for."""
    from preftune.evaluate import pairs_eval_config

    run = {"data": {"max_length": None, "max_prompt_length": 128, "truncation": "keep_start"}}
    data = pairs_eval_config("m", "d.jsonl", run, None, None, 2, None, "float32").data
    assert (data.max_length, data.max_prompt_length, data.truncation) == (None, None, "keep_start")
    data = pairs_eval_config("m", "d.jsonl", run, None, None, 2, 64, "float32").data  # --max-length 64
    assert (data.max_length, data.max_prompt_length) == (64, 128)


@pytest.mark.parametrize("beta, loss, dtype, said", [
    (-1.0, None, "float32", "preftune eval pairs: --beta: Input should be greater than 0."),
    (None, "sigmoid,foo", "float32", "preftune eval pairs: --loss: unknown loss 'foo'; choose from"),
    (None, None, "fp8", "preftune eval pairs: --dtype: Input should be 'float32', 'bfloat16' or 'float16'."),
])
def test_eval_pairs_names_its_own_option_for_a_bad_value(beta, loss, dtype, said):
    """It said "key 'loss.beta'", a training key, for the --beta the user typed."""
    from preftune.evaluate import pairs_eval_config

    with pytest.raises(UserError) as caught:
        pairs_eval_config("m", "d.jsonl", {}, beta, loss, 2, None, dtype)
    assert str(caught.value).startswith(said), str(caught.value)


def test_eval_pairs_loss_listed_twice_is_told_without_a_training_key():
    """It said "put the sum of its weights in its loss.weights entry", a key eval pairs has no option for."""
    from preftune.evaluate import pairs_eval_config

    with pytest.raises(UserError) as caught:
        pairs_eval_config("m", "d.jsonl", {}, None, "sigmoid, sigmoid", 2, None, "float32")
    assert str(caught.value) == ("preftune eval pairs: --loss sigmoid, sigmoid: sigmoid is listed more than once; "
                                 "give each type once.")


def test_eval_pairs_exo_pair_without_label_smoothing_says_what_eval_pairs_can_do():
    """It said "set loss.label_smoothing: 0.001", a training key eval pairs has no option for."""
    from preftune.evaluate import pairs_eval_config

    with pytest.raises(UserError) as caught:
        pairs_eval_config("m", "d.jsonl", {"loss": {"type": "sigmoid"}}, None, "exo_pair", 2, None, "float32")
    assert str(caught.value).startswith("preftune eval pairs: --loss exo_pair needs label smoothing above 0")
    assert "(set in training)" in str(caught.value) and "pass another --loss" in str(caught.value)
    # A run trained with label smoothing is evaluated under exo_pair with it.
    run = {"loss": {"type": "sigmoid", "label_smoothing": 0.001}}
    config = pairs_eval_config("m", "d.jsonl", run, None, "exo_pair", 2, None, "float32")
    assert config.loss.types == ["exo_pair"] and config.loss.label_smoothing == 0.001


def test_eval_pairs_names_its_own_option_for_a_missing_model_folder(models, tmp_path):
    """A --model or --reference written as a path that names no folder said 'check model.path', a
    training key eval pairs has no option for."""
    data = write_pairs(tmp_path / "d.jsonl")
    for option, args in (("--model", ["--model", "./no-such-policy", "--reference", models["ref"]]),
                         ("--reference", ["--model", models["pol"], "--reference", "./no-such-reference"])):
        message = user_error(invoke(["pairs", "--data", data, *args, "--out", tmp_path / "o"]))
        assert message.endswith(f"does not exist; check {option}."), message


def test_eval_generate_names_its_own_option_for_a_missing_model_folder(models, prompts_file, tmp_path):
    """A --model or --reference written as a path that names no folder went to transformers as a
    hub id, which answered with its repo-id naming rules ("Repo id must use alphanumeric chars")."""
    for option, args in (("--model", ["--model", "./no-such-policy", "--reference", models["ref"]]),
                         ("--model", ["--model", models["pol"], "--model", "./no-such-policy",
                                      "--reference", models["ref"]]),
                         ("--reference", ["--model", models["pol"], "--reference", "./no-such-reference"])):
        message = user_error(invoke(["generate", "--prompts", prompts_file, "--judge", "reward:x.py:f",
                                     *args, "--out", tmp_path / "o"]))
        assert message.endswith(f"does not exist; check {option}."), message
    assert not (tmp_path / "o").exists()


def test_eval_of_a_run_folder_or_a_missing_folder_says_so(models, prompts_file, tmp_path):
    """Both said "no --reference given and no run config.yaml names one", which sent users
    looking for a reference when the --model itself was wrong."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {path: pi_sft}\n")
    data = write_pairs(tmp_path / "d.jsonl")
    for command in (["pairs", "--data", data],
                    ["generate", "--prompts", prompts_file, "--judge", "reward:x.py:f"]):
        message = user_error(invoke([*command, "--model", run]))
        assert "training run's folder, not a model" in message and str(run / "final") in message
        message = user_error(invoke([*command, "--model", tmp_path / "missing"]))
        assert message == f"model folder {tmp_path / 'missing'} does not exist; check --model.", message


# ------------------------------------------------------------------ eval generate


def test_generate_policy_equal_to_reference_has_zero_kl_and_only_ties(models, prompts_file, tmp_path):
    rigged_reward(tmp_path, {})
    judge = f"reward:{tmp_path / 'rigged.py'}:length"
    result = invoke(["generate", "--model", models["ref"], "--reference", models["ref"],
                     "--prompts", prompts_file, "--judge", judge, "--max-new-tokens", MAX_NEW,
                     "--out", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    assert "win rate" in result.output and "KL(pi||ref)" in result.output and "token-wise" in result.output
    record = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert GENERATE_KEYS <= set(record)
    assert record["kind"] == "generate" and record["n_prompts"] == len(PROMPTS)
    assert record["kl"] == 0.0 and record["kl_se"] == 0.0
    assert record["kl_tokens"] == 0.0 and record["kl_tokens_se"] == 0.0
    assert record["ties"] == len(PROMPTS) and record["win_rate"] == 0.5
    assert record["mean_reward"]["policy"] == record["mean_reward"]["reference"] > 0
    rows = read_records(tmp_path / "out" / "samples.jsonl")
    assert len(rows) == len(PROMPTS)
    for row, prompt in zip(rows, PROMPTS):
        assert set(row) == ROW_KEYS and row["prompt"] == prompt
        assert sorted(row["order"]) == ["policy", "reference"]
        assert row["responses"]["policy"] == row["responses"]["reference"]  # same seeds
        assert row["winner"] == "tie" and row["kl"] == 0.0 and row["kl_tokens"] == 0.0
        assert row["reward"]["policy"] == len(row["responses"]["policy"])
        assert 1 <= row["length"]["policy"] <= MAX_NEW
    assert record["mean_length"]["policy"] == sum(r["length"]["policy"] for r in rows) / len(rows)


def test_generate_summary_by_hand_ties_count_half_and_one_prompt_has_null_errors():
    """eval.json's numbers from samples.jsonl rows, worked out by hand: 2 wins, 1 tie and 1 loss
    score (2 + 1/2) / 4 with Wilson's interval at n = 4; standard errors use n - 1; the reward
    margin is paired (per prompt); and one prompt's standard errors are null, not NaN (no JSON)."""
    from preftune.eval_generate import Judge, Samples, summarize
    from preftune.sampling_settings import SamplingSettings

    def row(winner, policy_reward, reference_reward, kl, kl_tokens, policy_length, reference_length):
        return {"winner": winner, "reward": {"policy": policy_reward, "reference": reference_reward},
                "kl": kl, "kl_tokens": kl_tokens, "length": {"policy": policy_length, "reference": reference_length}}

    rows = [row("policy", 3.0, 1.0, 0.5, 0.6, 4, 5), row("tie", 2.0, 2.0, -0.25, 0.25, 6, 3),
            row("reference", 1.0, 2.5, 1.25, 1.0, 2, 2), row("policy", 4.0, 0.0, 0.5, 0.75, 4, 6)]
    samples = [Samples(label, label, [], [], [], []) for label in ("pol", "reference")]
    judge, settings = Judge("reward", "reward:r.py:f"), SamplingSettings(n=1)
    record = summarize(rows, *samples, judge, settings, None)

    z = 1.959963984540054
    p, n = 2.5 / 4, 4
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (record["wins"], record["ties"], record["losses"]) == (2, 1, 1)
    assert record["win_rate"] == 0.625
    assert record["win_rate_ci"] == pytest.approx([centre - half, centre + half], abs=1e-12)  # [0.2194, 0.9081]
    # kl: mean 0.5, deviations 0, -0.75, 0.75, 0: sd sqrt(1.125 / 3), se sd / 2
    assert (record["kl"], record["kl_se"]) == pytest.approx((0.5, math.sqrt(1.125 / 3) / 2), abs=1e-12)
    # kl_tokens: mean 0.65, deviations -0.05, -0.4, 0.35, 0.1: squares sum to 0.295
    assert (record["kl_tokens"], record["kl_tokens_se"]) == pytest.approx((0.65, math.sqrt(0.295 / 3) / 2), abs=1e-12)
    # margins 2, 0, -1.5, 4: mean 1.125, squared deviations sum to 17.1875
    assert (record["reward_margin"], record["reward_margin_se"]) == pytest.approx(
        (1.125, math.sqrt(17.1875 / 3) / 2), abs=1e-12)
    assert record["mean_reward"] == {"policy": 2.5, "reference": 1.375}
    assert record["mean_length"] == {"policy": 4.0, "reference": 4.0}

    one = summarize(rows[:1], *samples, judge, settings, None)
    assert (one["win_rate"], one["win_rate_ci"]) == (1.0, [pytest.approx(1 / (1 + z * z)), 1.0])
    assert one["kl"] == 0.5 and one["kl_se"] is None and one["kl_tokens_se"] is None
    assert one["reward_margin_se"] is None and one["mean_reward_se"] == {"policy": None, "reference": None}
    assert one["mean_length_se"] == {"policy": None, "reference": None}
    json.dumps(one, allow_nan=False)  # eval.json stays valid JSON


def test_generate_printout_counts_one_in_the_singular(capsys):
    """It said "on 1 prompts (... 1 wins, 0 ties, 0 losses)"."""
    from preftune.eval_cli import _print_generation_record

    record = {"system": "pol", "n_prompts": 1, "judge": "reward:r.py:f", "win_rate": 1.0,
              "win_rate_ci": [0.2, 1.0], "wins": 1, "ties": 0, "losses": 0, "kl": 0.0, "kl_se": 0.0,
              "kl_tokens": 0.0, "mean_length": {"policy": 3.0, "reference": 3.0}}
    _print_generation_record(record, "out")
    said = capsys.readouterr().out
    assert "pol vs reference on 1 prompt (judge" in said and "(1 win, 0 ties, 0 losses)" in said
    _print_generation_record({**record, "n_prompts": 3, "wins": 0, "ties": 1, "losses": 2}, "out")
    assert "on 3 prompts" in (said := capsys.readouterr().out) and "(0 wins, 1 tie, 2 losses)" in said


def test_score_human_printout_counts_one_in_the_singular(monkeypatch, tmp_path):
    """It said "from 1 votes on 1 prompts"."""
    import preftune.eval_human

    record = {"system": "pol", "win_rate": 1.0, "win_rate_ci": [0.2, 1.0], "n_votes": 1, "n_prompts": 1,
              "n_unjudged": 0}
    monkeypatch.setattr(preftune.eval_human, "score_human",
                        lambda db, targets, out, n_bootstrap: {"evals": [record], "leaderboard_text": None})
    result = invoke(["score-human", tmp_path, "--db", tmp_path / "labels.db"])
    assert result.exit_code == 0, result.output
    assert "from 1 vote on 1 prompt (0 not judged yet)" in result.output


def test_generate_rigged_reward_gives_win_rate_one_and_exact_kl(models, prompts_file, tmp_path,
                                                                own_texts):
    judge = rigged_reward(tmp_path, {text: 1.0 for text in own_texts["pol"]})
    result = invoke(["generate", "--model", models["pol"], "--reference", models["ref"],
                     "--prompts", prompts_file, "--judge", judge, "--max-new-tokens", MAX_NEW])
    assert result.exit_code == 0, result.output
    record = json.loads((models["pol"] / "eval.json").read_text())  # beside the model
    n = len(PROMPTS)
    assert (record["win_rate"], record["wins"], record["ties"]) == (1.0, n, 0)
    expected = win_rate(n, 0, n)
    assert record["win_rate_ci"] == pytest.approx([expected.lower, expected.upper])
    assert 0.4 < record["win_rate_ci"][0] < 0.6 and record["win_rate_ci"][1] == 1.0
    assert record["mean_reward"] == {"policy": 1.0, "reference": 0.0}

    # KL: log pi(y|x) - log ref(y|x) on the exact ids the policy sampled, row by row, unpadded.
    rows = read_records(models["pol"] / "samples.jsonl")
    policy, tokenizer = load_model_and_tokenizer(str(models["pol"]))
    reference, _ = load_model_and_tokenizer(str(models["ref"]))
    settings = SamplingSettings(temperature=1.0, max_new_tokens=MAX_NEW, seed=0, n=1)
    prompt_ids, completions = generate_token_ids(policy, tokenizer, PROMPTS, range(n), settings)
    log_ratios = []
    for row, p, (c,) in zip(rows, prompt_ids, completions):
        ids = torch.tensor([p + c], device=policy.device)
        mask = torch.tensor([[0] * len(p) + [1] * len(c)], device=policy.device)
        with torch.no_grad():
            pi = float(naive_completion_logps(policy, ids, torch.ones_like(ids), mask)[0])
            ref = float(naive_completion_logps(reference, ids, torch.ones_like(ids), mask)[0])
        assert row["logps"]["policy"] == pytest.approx(pi, abs=1e-3)
        assert row["logps"]["reference"] == pytest.approx(ref, abs=1e-3)
        log_ratios.append(pi - ref)
    mean = sum(log_ratios) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in log_ratios) / (n - 1) / n)
    assert record["kl"] == pytest.approx(mean, abs=1e-3)
    assert record["kl_se"] == pytest.approx(se, abs=1e-3)


def test_generate_kl_tokens_is_the_summed_exact_kl_of_both_models_next_token_distributions(
        models, prompts_file, tmp_path):
    """Per row, sum over the counted positions (the stop token's included) of
    sum_v pi(v) (log pi(v) - log ref(v)), from each model's full logits in float64."""
    rigged_reward(tmp_path, {})
    record = compare_models([models["pol"]], models["ref"], prompts_file,
                            f"reward:{tmp_path / 'rigged.py'}:length", max_new_tokens=MAX_NEW,
                            out=tmp_path / "out")["evals"][0]
    rows = read_records(tmp_path / "out" / "samples.jsonl")
    policy, tokenizer = load_model_and_tokenizer(str(models["pol"]))
    reference, _ = load_model_and_tokenizer(str(models["ref"]))
    settings = SamplingSettings(temperature=1.0, max_new_tokens=MAX_NEW, seed=0, n=1)
    prompt_ids, completions = generate_token_ids(policy, tokenizer, PROMPTS, range(len(PROMPTS)), settings)
    per_row = []
    for row, p, (c,) in zip(rows, prompt_ids, completions):
        ids = torch.tensor([p + c], device=policy.device)
        with torch.no_grad():
            pi = torch.log_softmax(policy(input_ids=ids).logits[0].double(), -1)  # (T, V)
            ref = torch.log_softmax(reference(input_ids=ids).logits[0].double(), -1)  # (T, V)
        predicting = slice(len(p) - 1, len(p) + len(c) - 1)  # the positions that predict c
        expected = float((pi.exp() * (pi - ref))[predicting].sum())
        assert row["kl_tokens"] == pytest.approx(expected, abs=1e-5)
        assert row["kl_tokens"] >= 0.0
        per_row.append(expected)
    mean = sum(per_row) / len(per_row)
    se = math.sqrt(sum((x - mean) ** 2 for x in per_row) / (len(per_row) - 1) / len(per_row))
    assert record["kl_tokens"] == pytest.approx(mean, abs=1e-5)
    assert record["kl_tokens_se"] == pytest.approx(se, abs=1e-5)


def test_generate_against_a_reference_with_a_wider_output_layer_keeps_kl_and_has_no_token_wise_kl(
        models, prompts_file, tmp_path):
    """The same tokenizer with output layers of different sizes (Qwen2.5-7B against 0.5B, say):
    `kl` comes from each model's own log-probs as it always did; the token-wise KL compares
    distributions over the same ids, which these are not, so it is null, not a crash."""
    reference, tokenizer = load_model_and_tokenizer(str(models["ref"]))
    reference.resize_token_embeddings(len(tokenizer) + 8, mean_resizing=False)  # rows no token uses
    reference.save_pretrained(tmp_path / "wide_ref")
    tokenizer.save_pretrained(tmp_path / "wide_ref")
    rigged_reward(tmp_path, {})
    result = invoke(["generate", "--model", models["pol"], "--reference", tmp_path / "wide_ref",
                     "--prompts", prompts_file, "--judge", f"reward:{tmp_path / 'rigged.py'}:length",
                     "--max-new-tokens", MAX_NEW, "--out", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    assert "KL(pi||ref)" in result.output
    assert "token-wise  none: the policy's and the reference's output layers differ in size" in result.output
    record = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert record["kl_tokens"] is None and record["kl_tokens_se"] is None
    rows = read_records(tmp_path / "out" / "samples.jsonl")
    assert all(row["kl_tokens"] is None for row in rows)
    assert record["kl"] == pytest.approx(sum(row["kl"] for row in rows) / len(rows)) and record["kl"] != 0.0


def _policy_with_generation_config(models, tmp_path, generation_config):
    policy = tmp_path / "pol"
    shutil.copytree(models["pol"], policy)
    path = policy / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **generation_config}))
    return policy


@pytest.mark.parametrize("generation_config", [{"repetition_penalty": 1e4}, {"no_repeat_ngram_size": 1}])
def test_generate_samples_the_policy_itself_whatever_its_generation_config(
        models, prompts_file, tmp_path, generation_config):
    """A repetition penalty in generation_config.json (Qwen2.5-Instruct ships one) would make
    the samples not the policy's, and 'kl' not KL(pi || ref): sampling sets it aside, and says so."""
    rigged_reward(tmp_path, {})
    judge = f"reward:{tmp_path / 'rigged.py'}:length"
    plain = compare_models([models["pol"]], models["ref"], prompts_file, judge, max_new_tokens=8,
                           out=tmp_path / "plain")["evals"][0]
    policy = _policy_with_generation_config(models, tmp_path, generation_config)
    name = next(iter(generation_config))
    with pytest.warns(UserWarning, match=rf"sampling sets aside {name}="):
        shaped = compare_models([policy], models["ref"], prompts_file, judge, max_new_tokens=8,
                                out=tmp_path / "shaped")["evals"][0]
    assert "kl_note" not in shaped and shaped["kl"] == pytest.approx(plain["kl"], abs=1e-6)

    def responses(out):
        return [row["responses"]["policy"] for row in read_records(tmp_path / out / "samples.jsonl")]

    assert responses("shaped") == responses("plain")


def test_generate_says_which_sampling_settings_of_the_models_generation_config_it_does_not_use(
        models, prompts_file, tmp_path):
    """Qwen2.5-Instruct's generation_config.json suggests temperature 0.7, top-k 20, top-p 0.8;
    sampling draws from the full distribution unless told, and said nothing of it."""
    rigged_reward(tmp_path, {})
    judge = f"reward:{tmp_path / 'rigged.py'}:length"
    policy = _policy_with_generation_config(
        models, tmp_path, {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8})
    with pytest.warns(UserWarning, match=r"its generation config suggests temperature=0\.7, top_k=20, "
                                         r"top_p=0\.8; sampling uses --temperature 1\.0, --top-k 0, "
                                         r"--top-p 1\.0, --min-p 0\.0 as given \(top-k 0 is off\); to "
                                         r"sample as the model suggests, pass its values as these options\.$") as said:
        compare_models([policy], models["ref"], prompts_file, judge, max_new_tokens=2, out=tmp_path / "a")
    # Warned from preftune's own file, so the CLI prints it as one line (it printed torch's
    # _contextlib.py path and a line of its code around the sentence).
    from pathlib import Path

    import preftune
    package = str(Path(preftune.__file__).parent)
    assert [w.filename for w in said if "suggests" in str(w.message)][0].startswith(package)
    with warnings.catch_warnings(record=True) as caught:  # drawn as suggested: nothing to say
        warnings.simplefilter("always")
        compare_models([policy], models["ref"], prompts_file, judge, max_new_tokens=2, out=tmp_path / "b",
                       temperature=0.7, top_k=20, top_p=0.8)
    assert not [w for w in caught if "suggests" in str(w.message)]


@pytest.mark.parametrize("drawn, said", [({"temperature": 0.7}, "temperature 0.7"),
                                         ({"top_k": 5, "min_p": 0.1}, "top-k 5, min-p 0.1")])
def test_generate_says_when_kl_is_not_kl_of_the_policy(models, prompts_file, tmp_path, drawn, said):
    rigged_reward(tmp_path, {})
    record = compare_models([models["pol"]], models["ref"], prompts_file,
                            f"reward:{tmp_path / 'rigged.py'}:length", max_new_tokens=2,
                            out=tmp_path / "out", **drawn)["evals"][0]
    assert record["kl_note"].startswith(f"samples were drawn at {said}, not from the policy itself")
    assert "not KL(pi || ref)" in record["kl_note"] and "'kl_tokens'" in record["kl_note"]
    assert record["sampling"] == {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 2, "seed": 0, **drawn}


def test_leaderboard_orders_systems_by_a_rigged_reward(models, prompts_file, tmp_path, own_texts):
    table = {**{t: 1.0 for t in own_texts["pol"]}, **{t: 2.0 for t in own_texts["pol2"]}}
    judge = rigged_reward(tmp_path, table)
    out = tmp_path / "out"
    result = compare_models([models["pol"], models["pol2"]], models["ref"], prompts_file, judge,
                            max_new_tokens=MAX_NEW, out=out, n_bootstrap=100)
    order = [row["system"] for row in result["leaderboard"]["ratings"]]
    assert order == ["pol2", "pol", "reference"]
    ratings = {row["system"]: row for row in result["leaderboard"]["ratings"]}
    assert ratings["reference"]["rating"] == 1000.0
    assert ratings["pol2"]["wins"] == 2 * len(PROMPTS) and ratings["reference"]["losses"] == 2 * len(PROMPTS)
    saved = json.loads((out / "leaderboard.json").read_text())
    assert saved["anchor"] == "reference"
    # Comparisons on one prompt share the reference's response: the bootstrap resamples prompts.
    assert saved["resampled"] == "groups of comparisons (prompts)"
    assert "pol2" in (out / "leaderboard.md").read_text()
    for name in ("pol", "pol2"):
        record = json.loads((out / name / "eval.json").read_text())
        assert record["system"] == name and record["win_rate"] == 1.0
        assert (out / name / "samples.jsonl").is_file()


def test_a_reward_model_judge_goes_on_the_device_asked_for(tmp_path, monkeypatch):
    """`eval generate --device cpu` put the policy and reference on the CPU but a reward-model
    folder judge on "auto" (a GPU if any), so a judge meant to stay off a busy GPU went there."""
    import preftune.modeling
    from preftune.eval_generate import parse_judge

    save_reward_model(tmp_path / "rm")
    asked = []
    real_pick_device = preftune.modeling.pick_device
    monkeypatch.setattr(preftune.modeling, "pick_device",
                        lambda device, setting: asked.append(device) or real_pick_device("cpu", setting))
    parse_judge(str(tmp_path / "rm"), device="cpu")
    assert asked == ["cpu"]


def test_reward_batch_size_sets_the_texts_a_judge_folder_scores_per_forward_pass_and_not_the_scores(
        models, prompts_file, tmp_path, monkeypatch):
    """`eval generate --judge FOLDER` scored 8 texts per forward pass whatever the GPU, while
    `label auto` took --reward-batch-size; it takes it too, and the rewards stay the same."""
    folder = save_reward_model(tmp_path / "rm")
    passes = count_reward_model_passes(monkeypatch)

    def generate(judge, out, *extra):
        return invoke(["generate", "--model", models["pol"], "--reference", models["ref"], "--prompts",
                       prompts_file, "--judge", judge, "--max-new-tokens", MAX_NEW, "--device", "cpu",
                       "--out", tmp_path / out, *extra])

    rewards = {}
    for name, extra in (("default", []), ("three", ["--reward-batch-size", 3])):
        passes.clear()
        result = generate(folder, name, *extra)
        assert result.exit_code == 0, result.output
        rewards[name] = [r for row in read_records(tmp_path / name / "samples.jsonl")
                         for r in (row["reward"]["policy"], row["reward"]["reference"])]
        # The reference's 4 responses are scored in one call, then the policy's 4.
        assert passes == {"default": [4, 4], "three": [3, 1, 3, 1]}[name], name
    assert rewards["three"] == pytest.approx(rewards["default"], abs=1e-4)
    assert "--reward-batch-size must be at least 1, got 0." in user_error(
        generate(folder, "zero", "--reward-batch-size", 0))
    rigged_reward(tmp_path, {})
    for judge in (f"reward:{tmp_path / 'rigged.py'}:length", "human"):
        said = user_error(generate(judge, "f", "--reward-batch-size", 4))
        assert said.startswith("--reward-batch-size sets the texts a reward model folder scores per forward "
                               f"pass, but --judge {judge} is not one; drop it."), said


def test_reward_batch_size_with_a_mistyped_judge_folder_says_the_folder_is_missing(tmp_path):
    """--judge ./rm-typo --reward-batch-size 16 said to drop --reward-batch-size, as if the
    judge were a function; the folder's own sentence comes first, as without the option."""
    from preftune.eval_generate import parse_judge

    for spec in (str(tmp_path / "rm-typo"), f"reward:{tmp_path / 'rm-typo'}"):
        with pytest.raises(UserError, match="no such folder; check the path to the reward model's folder"):
            parse_judge(spec, reward_batch_size=16)


@pytest.mark.parametrize("flag, trusted", [([], False), (["--trust-remote-code"], True)])
def test_trust_remote_code_reaches_the_judge_only(models, prompts_file, tmp_path, monkeypatch, flag, trusted):
    """An ArmoRM-style judge folder runs its own code only with --trust-remote-code (see
    tests/labeling/test_labeling_auto.py); the flag goes to the reward model, not the policies."""
    import preftune.eval_generate

    asked = []

    def fake_load_reward(target, batch_size=None, device=None, trust_remote_code=False):
        asked.append(trust_remote_code)
        raise UserError("stop here")

    monkeypatch.setattr(preftune.eval_generate, "load_reward", fake_load_reward)
    result = invoke(["generate", "--model", models["pol"], "--reference", models["ref"], "--prompts",
                     prompts_file, "--judge", tmp_path, "--device", "cpu", *flag])
    assert user_error(result) == "stop here" and asked == [trusted]


def test_pairs_and_prompts_longer_than_the_models_positions_are_one_sentence(tiny_model_factory, tmp_path):
    """A GPT-2 of 32 learned positions: eval pairs (max_length 1024 by default) and eval generate
    on a long prompt failed with an IndexError traceback from the position embedding."""
    short = tiny_model_factory("gpt2", hidden_size=32, max_positions=32)
    data = write_pairs(tmp_path / "d.jsonl")
    with data.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "Tell me a story.", "rejected": " No.",
                            "chosen": " The quick brown fox jumps over the lazy dog." * 4}) + "\n")
    message = user_error(invoke(["pairs", "--model", short, "--reference", short, "--data", data,
                                 "--device", "cpu", "--out", tmp_path / "e"]))
    assert re.fullmatch(rf"{re.escape(str(data))}, line 4: the pair runs to \d+ tokens, more than the 32 "
                        rf"positions of --model {re.escape(str(short))} \(max_position_embeddings in its "
                        r"config.json\); pass --max-length 32 or less\.", message), message
    result = invoke(["pairs", "--model", short, "--reference", short, "--data", data, "--device", "cpu",
                     "--max-length", 32, "--out", tmp_path / "e"])
    assert result.exit_code == 0, result.output

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n" + "The quick brown fox jumps over the lazy dog. " * 3 + "\n")
    message = user_error(invoke(["generate", "--model", short, "--reference", short, "--prompts", prompts,
                                 "--judge", rigged_reward(tmp_path, {}), "--max-new-tokens", 8,
                                 "--device", "cpu", "--out", tmp_path / "g"]))
    assert re.fullmatch(r"prompt 1 \(counting from 0, as its pair id does\) is (\d+) tokens, so with "
                        r"--max-new-tokens 8 it needs \d+ positions, more than the 32 of .*; shorten or drop "
                        r"that prompt, or lower --max-new-tokens\.", message), message


def test_generate_names_every_prompt_too_long_for_the_model_before_sampling_any(
        tiny_model_factory, tmp_path, monkeypatch):
    """Checked batch by batch, eval generate sampled the batches before the first too long
    prompt, stopped at its batch and named it alone (the next one stopped the rerun)."""
    short = tiny_model_factory("gpt2", hidden_size=32, max_positions=32)
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 3
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["hello", long_prompt, "hi", long_prompt]) + "\n")
    sampled = []
    monkeypatch.setattr("preftune.eval_generate.generate_token_ids",
                        lambda *args: sampled.append(args) or generate_token_ids(*args))
    message = user_error(invoke(["generate", "--model", short, "--reference", short, "--prompts", prompts,
                                 "--judge", rigged_reward(tmp_path, {}), "--max-new-tokens", 8,
                                 "--batch-size", 1, "--device", "cpu", "--out", tmp_path / "g"]))
    assert re.fullmatch(r"2 prompts \(counting from 0, as pair ids do: 1, 3\) with --max-new-tokens 8 need "
                        r"more than the 32 positions of .*, the longest needing \d+; shorten or drop those "
                        r"prompts, or lower --max-new-tokens\.", message), message
    assert sampled == []


def test_generate_checks_every_models_positions_before_any_model_samples(
        tiny_model_factory, tmp_path, monkeypatch):
    """Each model's positions were checked when its turn to sample came: a prompt too long for
    the policy stopped the run only after the reference had sampled every prompt."""
    roomy = tiny_model_factory("gpt2", hidden_size=32, max_positions=128)
    short = tiny_model_factory("gpt2", hidden_size=32, max_positions=32)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n" + "The quick brown fox jumps over the lazy dog. " * 3 + "\n")

    def no_sampling(*args):
        raise AssertionError("a model sampled before every model's positions were checked")

    monkeypatch.setattr("preftune.eval_generate.generate_token_ids", no_sampling)
    message = user_error(invoke(["generate", "--model", short, "--reference", roomy, "--prompts", prompts,
                                 "--judge", rigged_reward(tmp_path, {}), "--max-new-tokens", 8,
                                 "--device", "cpu", "--out", tmp_path / "g"]))
    assert re.fullmatch(rf"prompt 1 \(counting from 0, as its pair id does\) is \d+ tokens, so with "
                        rf"--max-new-tokens 8 it needs \d+ positions, more than the 32 of "
                        rf"{re.escape(str(short))} \(max_position_embeddings in its config.json\); shorten "
                        r"or drop that prompt, or lower --max-new-tokens\.", message), message


def test_generate_names_the_prompts_of_the_model_with_the_fewest_positions(tiny_model_factory, tmp_path):
    """The reference (64 positions) refuses one prompt, the policy (32) two: the one sentence is
    the policy's and names both, so that dropping what it names leaves no prompt to stop a rerun."""
    roomy = tiny_model_factory("gpt2", hidden_size=32, max_positions=64)
    short = tiny_model_factory("gpt2", hidden_size=32, max_positions=32)
    sentence = "The quick brown fox jumps over the lazy dog. "
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["hello", sentence * 3, sentence * 6]) + "\n")
    message = user_error(invoke(["generate", "--model", short, "--reference", roomy, "--prompts", prompts,
                                 "--judge", rigged_reward(tmp_path, {}), "--max-new-tokens", 8,
                                 "--device", "cpu", "--out", tmp_path / "g"]))
    assert re.fullmatch(rf"2 prompts \(counting from 0, as pair ids do: 1, 2\) with --max-new-tokens 8 need "
                        rf"more than the 32 positions of {re.escape(str(short))} .*", message), message


# ------------------------------------------------------------------ human judge


def vote_as(store, annotator, rows, choose) -> int:
    """Vote on every pair the labeling page would show `annotator`; returns the vote count."""
    by_id = {row["pair_id"]: row for row in rows}
    votes = 0
    while (shown := store.next_pair(annotator)) is not None:
        row = by_id[shown["pair_id"]]
        side = "left" if shown["left"] == row["responses"]["policy"] else "right"
        choice = choose(row, side)
        store.record_vote(annotator, shown["pair_id"], choice, None, f"key-{votes:04d}")
        votes += 1
    return votes


def test_human_judge_queues_blind_pairs_and_scores_the_votes(models, prompts_file, tmp_path):
    db, out = tmp_path / "labels.db", tmp_path / "out"
    result = invoke(["generate", "--model", models["pol"], "--reference", models["ref"],
                     "--prompts", prompts_file, "--judge", "human", "--db", db,
                     "--max-new-tokens", MAX_NEW, "--out", out])
    assert result.exit_code == 0, result.output
    assert "preftune label serve --db" in result.output and "preftune eval score-human" in result.output
    pending = json.loads((out / "eval.json").read_text())
    assert pending["status"] == "awaiting_votes" and pending["win_rate"] is None
    assert pending["kl"] is not None

    early = invoke(["score-human", out, "--db", db])
    assert "no votes yet" in user_error(early)
    # Another database said "no votes yet" too, sending people to vote where nothing was queued.
    other = Store(tmp_path / "other.db")
    other.add_pairs([Pair("p0", "x", ("a", "b"))])
    other.close()
    elsewhere = user_error(invoke(["score-human", out, "--db", tmp_path / "other.db"]))
    assert "holds none of the" in elsewhere and f"queued them in ({db})" in elsewhere

    rows = read_records(out / "samples.jsonl")
    store = Store(db)
    stored = store.pairs()
    assert sorted(stored) == sorted(row["pair_id"] for row in rows)
    for row in rows:  # the database holds the texts in the recorded order, and no system names
        assert stored[row["pair_id"]]["responses"] == tuple(row["responses"][s] for s in row["order"])
        assert "policy" not in row["pair_id"] and "reference" not in row["pair_id"]
    token = store.add_annotator("alice")
    alice = store.authenticate(token)
    last = rows[-1]["pair_id"]
    # Prefer the policy everywhere except one tie: win rate (n - 1 + 1/2) / n.
    votes = vote_as(store, alice, rows, lambda row, side: "tie" if row["pair_id"] == last else side)
    store.close()
    assert votes == len(PROMPTS)

    result = invoke(["score-human", out, "--db", db])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "eval.json").read_text())
    n = len(PROMPTS)
    assert record["status"] == "scored" and record["n_votes"] == n
    assert (record["wins"], record["ties"], record["losses"]) == (n - 1, 1, 0)
    assert record["win_rate"] == pytest.approx((n - 0.5) / n)
    expected = win_rate(n - 0.5, 0, n)
    assert record["win_rate_ci"] == pytest.approx([expected.lower, expected.upper])
    scored = read_records(out / "samples.jsonl")
    assert [r["winner"] for r in scored] == ["policy"] * (n - 1) + ["tie"]
    assert all(r["votes"][0]["annotator"] == "alice" for r in scored)


def test_generate_says_where_the_leaderboard_went(models, prompts_file, tmp_path):
    """leaderboard.json was written to --out (else the models' common folder) without a word."""
    out = tmp_path / "out"
    result = invoke(["generate", "--model", models["pol"], "--model", models["pol2"],
                     "--reference", models["ref"], "--prompts", prompts_file,
                     "--judge", rigged_reward(tmp_path, {}), "--max-new-tokens", 2,
                     "--n-bootstrap", 10, "--out", out])
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'leaderboard.json'} and leaderboard.md beside it" in result.output


def test_human_votes_of_several_annotators_and_models(models, prompts_file, tmp_path):
    # Two annotators per pair: a pair's score is the mean of its votes, the win rate the mean
    # over pairs (n pairs, not 2n votes), and the leaderboard resamples prompts, not votes.
    db, out = tmp_path / "labels.db", tmp_path / "out"
    compare_models([models["pol"], models["pol2"]], models["ref"], prompts_file, "human",
                   max_new_tokens=MAX_NEW, out=out, db=db)
    rows = read_records(out / "pol" / "samples.jsonl") + read_records(out / "pol2" / "samples.jsonl")
    pol2_ids = {r["pair_id"] for r in read_records(out / "pol2" / "samples.jsonl")}
    store = Store(db, overlap=2)  # every pair to two annotators
    for name, prefers_pol2 in (("alice", True), ("bob", False)):
        who = store.authenticate(store.add_annotator(name))
        other = {"left": "right", "right": "left"}
        vote_as(store, who, rows, lambda row, side: side if prefers_pol2 or row["pair_id"]
                not in pol2_ids else other[side])
    store.close()
    result = invoke(["score-human", out / "pol", out / "pol2", "--db", db, "--out", out,
                     "--n-bootstrap", 50])
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'leaderboard.json'} and leaderboard.md beside it" in result.output
    n = len(PROMPTS)
    pol = json.loads((out / "pol" / "eval.json").read_text())
    pol2 = json.loads((out / "pol2" / "eval.json").read_text())
    assert (pol["win_rate"], pol["wins"], pol["n_votes"], pol["n_prompts"]) == (1.0, n, 2 * n, n)
    assert (pol2["win_rate"], pol2["ties"], pol2["n_votes"]) == (0.5, n, 2 * n)
    assert pol2["win_rate_ci"] == pytest.approx(list(win_rate(n / 2, 0, n)[1:]))
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["resampled"] == "groups of comparisons (prompts)" and board["n_comparisons"] == 4 * n


def test_a_reward_evaluation_beside_a_queued_human_one_keeps_its_samples(models, prompts_file, tmp_path):
    # One folder holds several evaluations; each has its own samples file, and a rerun reuses it.
    db, out = tmp_path / "labels.db", tmp_path / "out"
    common = ["generate", "--model", models["pol"], "--reference", models["ref"], "--prompts", prompts_file,
              "--max-new-tokens", MAX_NEW, "--out", out]
    assert invoke([*common, "--judge", "human", "--db", db]).exit_code == 0
    rigged_reward(tmp_path, {})
    length_judge = f"reward:{tmp_path / 'rigged.py'}:length"
    for _ in range(2):
        result = invoke([*common, "--judge", length_judge])
        assert result.exit_code == 0, result.output
        assert f"wrote {out / 'eval.json'} and samples-2.jsonl" in result.output  # not samples.jsonl
    records = {r["judge"]: r for r in json.loads((out / "eval.json").read_text())["evals"]}
    assert {j: r["samples"] for j, r in records.items()} == {"human": "samples.jsonl",
                                                             length_judge: "samples-2.jsonl"}
    assert sorted(p.name for p in out.glob("samples*.jsonl")) == ["samples-2.jsonl", "samples.jsonl"]

    rows = read_records(out / "samples.jsonl")
    store = Store(db)
    alice = store.authenticate(store.add_annotator("alice"))
    assert vote_as(store, alice, rows, lambda row, side: side) == len(PROMPTS)
    store.close()
    result = invoke(["score-human", out, "--db", db])
    assert result.exit_code == 0, result.output
    records = {r["judge"]: r for r in json.loads((out / "eval.json").read_text())["evals"]}
    assert records["human"]["status"] == "scored" and records["human"]["wins"] == len(PROMPTS)
    assert "win_rate" in records[length_judge]


# ------------------------------------------------------------------ errors and eval.json


def test_a_model_given_twice_is_refused_before_sampling(models, prompts_file, tmp_path):
    """Both copies were sampled, then the leaderboard fit failed on a model compared with itself,
    with its label mangled to '//...' and an output folder named after the whole path."""
    message = user_error(invoke(["generate", "--model", models["pol"], "--model", models["pol"],
                                 "--reference", models["ref"], "--prompts", prompts_file,
                                 "--judge", rigged_reward(tmp_path, {}), "--max-new-tokens", 2,
                                 "--out", tmp_path / "out"]))
    assert "is given twice" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("db", ["missing_dir/e.sqlite", "."])
def test_a_human_judges_db_is_checked_before_any_model_loads(models, prompts_file, tmp_path,
                                                              monkeypatch, db):
    """It was refused only when the pairs were queued, after every model had been sampled."""
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before --db was checked")

    monkeypatch.setattr("preftune.eval_generate.load_model_and_tokenizer", no_loading)
    message = user_error(invoke(["generate", "--model", models["pol"], "--reference", models["ref"],
                                 "--prompts", prompts_file, "--judge", "human",
                                 "--db", tmp_path / db, "--out", tmp_path / "out"]))
    problem = "is a folder" if db == "." else "which does not exist"
    assert f"--db {tmp_path / db}" in message and problem in message
    assert not (tmp_path / "out").exists()


def test_bad_judges_are_user_errors(models, prompts_file, tmp_path):
    args = ["generate", "--model", models["pol"], "--reference", models["ref"],
            "--prompts", prompts_file, "--max-new-tokens", 2, "--out", tmp_path]
    result = invoke([*args, "--judge", "human"])
    assert "--db" in user_error(result)
    result = invoke([*args, "--judge", f"reward:{tmp_path / 'missing.py'}:f"])
    message = user_error(result)
    assert "missing.py" in message and "--reward" not in message  # eval's option is --judge


def test_eval_json_keeps_one_record_per_evaluation_and_the_report_reads_them(tmp_path):
    write_eval_record(tmp_path, {"kind": "pairs", "reference": "r", "data": "d", "eval/loss": 1.0})
    write_eval_record(tmp_path, {"kind": "generate", "reference": "r", "judge": "j", "kl": 1.0})
    write_eval_record(tmp_path, {"kind": "generate", "reference": "r", "judge": "j", "kl": 2.0})
    evals = load_evals([tmp_path / "eval.json"])
    assert [(e["kind"], e.get("kl")) for e in evals] == [("pairs", None), ("generate", 2.0)]
    # Another temperature is another evaluation (a sweep keeps every point); another seed a rerun.
    for temperature, seed, kl in ((1.0, 0, 3.0), (0.5, 0, 4.0), (0.5, 1, 5.0)):
        write_eval_record(tmp_path, {"kind": "generate", "reference": "r", "judge": "j", "kl": kl,
                                     "sampling": {"temperature": temperature, "seed": seed}})
    evals = load_evals([tmp_path / "eval.json"])
    assert [e.get("kl") for e in evals] == [None, 2.0, 3.0, 5.0]


def test_another_model_evaluated_into_the_same_folder_keeps_the_first_record(tmp_path):
    """`eval pairs --model a --out E` then `--model b --out E` replaced a's record with b's."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    folder = tmp_path / "E"
    pairs = {"kind": "pairs", "reference": "r", "data": "d"}
    write_eval_record(folder, {**pairs, "model": str(tmp_path / "a"), "eval/loss": 1.0})
    write_eval_record(folder, {**pairs, "model": str(tmp_path / "b"), "eval/loss": 2.0})
    assert [e["eval/loss"] for e in load_evals([folder / "eval.json"])] == [1.0, 2.0]
    # The same model named another way is a rerun, which replaces its record.
    write_eval_record(folder, {**pairs, "model": str(tmp_path / "a" / ".." / "a"), "eval/loss": 3.0})
    assert [e["eval/loss"] for e in load_evals([folder / "eval.json"])] == [2.0, 3.0]


@pytest.mark.parametrize("max_positions, rope_scaling, usable", [
    (32, None, 32),
    # Qwen2.5's long-context YaRN: 4x its base length.
    (32, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 128),
    (32, {"type": "yarn", "factor": 4.0}, 128),  # the base length is max_position_embeddings
    # DeepSeek-V3's YaRN: max_position_embeddings is already the stretched length.
    (128, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 128),
    (32, {"rope_type": "linear", "factor": 2.0}, 64),
    (32, {"rope_type": "dynamic", "factor": 2.0}, 64),
    # Llama 3.1: max_position_embeddings is the stretched length, 8x original_max_position_embeddings.
    (32, {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 4,
          "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 32),
], ids=["plain", "yarn", "yarn-no-original", "yarn-stretched", "linear", "dynamic", "llama3"])
def test_pairs_may_run_to_the_length_a_rope_scaling_stretches_the_model_to(max_positions, rope_scaling, usable):
    """A model whose rope_scaling stretches its positions past max_position_embeddings (Qwen2.5
    with YaRN) was refused at its base length; it takes pairs up to the stretched length."""
    import types

    import transformers

    from preftune.evaluate import check_pairs_fit

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=max_positions,
                                      rope_scaling=rope_scaling)
    model = transformers.AutoModelForCausalLM.from_config(config)

    def fits(length):
        check_pairs_fit([types.SimpleNamespace(length=length, origin="d.jsonl, line 1")], "d.jsonl",
                        ((model, "--model", "m"),))

    fits(usable)
    kind = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type"))
    source = (f"{rope_scaling.get('original_max_position_embeddings', max_positions)} positions stretched "
              f"{rope_scaling['factor']:g}x by the {kind} rope_scaling in its config.json") \
        if kind in ("yarn", "linear", "dynamic") else "max_position_embeddings in its config.json"
    with pytest.raises(UserError, match=rf"^d.jsonl, line 1: the pair runs to {usable + 1} tokens, more than the "
                                        rf"{usable} positions of --model m \({source}\); pass --max-length "
                                        rf"{usable} or less\.$"):
        fits(usable + 1)


def test_a_full_disk_at_leaderboard_md_keeps_the_earlier_table(tmp_path, monkeypatch):
    # leaderboard.md was written in place: a full disk (or a kill) left half a table over the
    # earlier one, with an OSError traceback.
    import errno
    import os

    from preftune.bradley_terry import fit_ratings
    from preftune.eval_generate import save_leaderboard

    board = fit_ratings([("dpo", "sft")] * 6 + [("sft", "dpo")] * 2, anchor="sft", n_bootstrap=20)
    save_leaderboard(board, tmp_path)
    earlier = (tmp_path / "leaderboard.md").read_text()
    real_fsync = os.fsync

    def full_at_the_table(fd):  # the disk fills up at leaderboard.md, after leaderboard.json
        if "leaderboard.md" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_at_the_table)
    with pytest.raises(UserError, match=r"out of disk space while writing .*leaderboard\.md; any earlier "
                                        r"leaderboard\.md there is unchanged"):
        save_leaderboard(fit_ratings([("sft", "dpo")] * 6, anchor="sft", n_bootstrap=20), tmp_path)
    assert (tmp_path / "leaderboard.md").read_text() == earlier
