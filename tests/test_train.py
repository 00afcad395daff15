"""The training loop's promises: ln 2 at the start, accumulation equals a bigger batch, resume
equals an uninterrupted run, the reference never moves, and the CLI runs end to end."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from preftune_test_data import make_config, read_metrics
from safetensors.torch import load_file

from preftune.config import load_config
from preftune.train import train


def final_weights(run_dir):
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_first_step_loss_is_ln2_when_policy_equals_reference(tmp_path, tiny_model_factory, pairs_file, arch):
    cfg = make_config(tmp_path, tiny_model_factory(arch), pairs_file, train={"max_steps": 1})
    train(cfg)
    first = read_metrics(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    expected_keys = {"step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                     "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm", "learning_rate",
                     "tokens_per_second"}
    assert expected_keys <= set(first)
    assert first["logps/chosen"] < 0 and first["grad_norm"] > 0


def test_accumulation_equals_a_bigger_batch(tmp_path, tiny_llama, pairs_file):
    big = make_config(tmp_path, tiny_llama, pairs_file, "big", train={"batch_size": 8, "grad_accum": 1})
    small = make_config(tmp_path, tiny_llama, pairs_file, "small", train={"batch_size": 1, "grad_accum": 8})
    train(big)
    train(small)
    for a, b in zip(read_metrics(tmp_path / "big"), read_metrics(tmp_path / "small"), strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    wa, wb = final_weights(tmp_path / "big"), final_weights(tmp_path / "small")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0)


def test_resumed_run_equals_uninterrupted(tmp_path, tiny_llama, pairs_file):
    common = {"batch_size": 2, "save_every": 2, "epochs": 2, "max_steps": None}
    whole = make_config(tmp_path, tiny_llama, pairs_file, "whole", train=common,
                        optim={"scheduler": "constant", "warmup_steps": 3, "lr": 1e-3})
    train(whole)
    part = make_config(tmp_path, tiny_llama, pairs_file, "part", train={**common, "max_steps": 6},
                       optim={"scheduler": "constant", "warmup_steps": 3, "lr": 1e-3})
    train(part)
    # Resume with the whole run's config (a schedule that depends on max_steps would differ).
    resumed = make_config(tmp_path, tiny_llama, pairs_file, "part", train=common,
                          optim={"scheduler": "constant", "warmup_steps": 3, "lr": 1e-3})
    train(resumed, resume=str(tmp_path / "part" / "checkpoints" / "step-000006"))
    wa, wb = final_weights(tmp_path / "whole"), final_weights(tmp_path / "part")
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    losses_whole = [m["loss"] for m in read_metrics(tmp_path / "whole")]
    losses_part = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "part")}
    assert [losses_part[s] for s in range(1, len(losses_whole) + 1)] == losses_whole


def test_reference_never_changes(tmp_path, tiny_llama, pairs_file, monkeypatch):
    import preftune.reference as reference_module

    captured = {}
    original = reference_module.make_reference

    def capture(policy, model_cfg):
        captured["model"] = original(policy, model_cfg)
        captured["before"] = {k: v.clone() for k, v in captured["model"].state_dict().items()}
        return captured["model"]

    monkeypatch.setattr(reference_module, "make_reference", capture)
    train(make_config(tmp_path, tiny_llama, pairs_file, train={"max_steps": 3}))
    after = captured["model"].state_dict()
    assert not captured["model"].training
    assert all(not p.requires_grad for p in captured["model"].parameters())
    for name, tensor in captured["before"].items():
        assert torch.equal(tensor, after[name]), name
    policy = final_weights(tmp_path / "run")
    assert any(not torch.equal(policy[n], captured["before"][n]) for n in policy)  # the policy moved


def test_dpo_learns_the_preference(tmp_path, tiny_llama, pairs_file):
    cfg = make_config(tmp_path, tiny_llama, pairs_file, train={"max_steps": 12}, optim={"lr": 3e-3})
    train(cfg)
    metrics = read_metrics(tmp_path / "run")
    assert metrics[-1]["loss"] < 0.5 < math.log(2)
    assert metrics[-1]["rewards/accuracies"] == 1.0


def test_cli_train_end_to_end(tmp_path, tiny_llama, pairs_file):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from preftune.cli import app

    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{path: {tiny_llama}}}\ndata: {{train: {pairs_file}, eval_fraction: 0.25}}\n")
    out = tmp_path / "cli-run"
    result = CliRunner().invoke(app, ["train", str(config), f"train.output_dir={out}", "train.max_steps=2",
                                      "train.batch_size=4", "train.eval_every=1", "optim.lr=1e-4"])
    assert result.exit_code == 0, result.output
    assert "16 rows read" in result.output and "12 train pairs, 4 eval pairs" in result.output
    assert AutoModelForCausalLM.from_pretrained(out / "final") is not None
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/rewards/accuracies" in x for x in lines)
    assert (out / "config.yaml").exists() and (out / "report.html").exists()


def test_cli_prints_preftune_warnings_as_one_line_without_code(monkeypatch):
    # A corrupt checkpoint passed over at --resume warns; the user should not read a source path
    # and a line of preftune's code as if something had crashed.
    import warnings
    from pathlib import Path

    from preftune import cli

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    cli.show_warnings_as_one_line()
    ours = str(Path(cli.__file__).with_name("checkpoint.py"))
    assert warnings.formatwarning("checkpoint step-000004 is corrupt; using an earlier one.", UserWarning, ours,
                                  174, "found = latest_good_checkpoint(output_dir)") == \
        "warning: checkpoint step-000004 is corrupt; using an earlier one.\n"
    theirs = warnings.formatwarning("deprecated", FutureWarning, "/site-packages/other/x.py", 3, "call()")
    assert "/site-packages/other/x.py:3: FutureWarning: deprecated" in theirs


def test_cli_user_errors_are_one_sentence(tmp_path, tiny_llama, pairs_file):
    from typer.testing import CliRunner

    from preftune.cli import app

    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{path: {tiny_llama}}}\ndata: {{train: {pairs_file}}}\noptim: {{learning_rate: 1}}\n")
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 2
    assert "unknown key 'optim.learning_rate'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.path and cfg.data.train


def test_readme_train_commands_on_shipped_configs_validate():
    """A README command line whose overrides a config refuses is the first thing a user copies."""
    readme = (Path(__file__).parents[1] / "README.md").read_text().replace("\\\n", " ")
    commands = [line.split("#")[0].split()[2:] for line in readme.splitlines()
                if line.startswith("preftune train configs/")]
    assert commands
    for config, *overrides in commands:
        load_config(Path(__file__).parents[1] / config, overrides)


def test_python_api_takes_a_config_a_dict_or_a_yaml_path(tmp_path, tiny_llama, pairs_file):
    import preftune

    cfg = make_config(tmp_path, tiny_llama, pairs_file, "api", train={"max_steps": 1})
    assert preftune.train(cfg) == tmp_path / "api" / "final"
    yaml_path = tmp_path / "api" / "config.yaml"
    raw = load_config(yaml_path).model_dump(mode="json")
    raw["train"]["output_dir"] = str(tmp_path / "api-dict")
    assert preftune.train(raw) == tmp_path / "api-dict" / "final"
    # Into the folder of the first run again: starting over there has to be asked for.
    assert preftune.train(yaml_path, resume=False, overwrite=True).exists()


def test_no_pair_left_after_tokenization_names_the_cause_and_the_setting(tmp_path, tiny_llama, pairs_file):
    from preftune.errors import UserError

    cfg = make_config(tmp_path, tiny_llama, pairs_file, data={"max_length": 4})
    with pytest.raises(UserError) as caught:
        train(cfg)
    message = str(caught.value)
    assert message.startswith("no training pairs are left of the 16 rows read: 16 dropped by tokenization "
                              "(16 prompt longer than data.max_length)")
    assert "raise data.max_length (now 4)" in message and "batch_size" not in message
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def test_a_few_pairs_short_of_one_step_still_advise_a_smaller_batch(tmp_path, tiny_llama, pairs_file):
    from preftune.errors import UserError

    with pytest.raises(UserError, match="16 training pairs are fewer than one optimizer step .* lower "
                                        "train.batch_size"):
        train(make_config(tmp_path, tiny_llama, pairs_file, train={"batch_size": 32}))
    # At batch_size 1 only the accumulation can shrink; the advice was "lower train.batch_size".
    with pytest.raises(UserError, match=r"\(32 = batch_size x grad_accum x processes\); lower train.grad_accum\.$"):
        train(make_config(tmp_path, tiny_llama, pairs_file, train={"batch_size": 1, "grad_accum": 32}))
    with pytest.raises(UserError, match=r"; lower train.batch_size or train.grad_accum\.$"):
        train(make_config(tmp_path, tiny_llama, pairs_file, train={"batch_size": 4, "grad_accum": 8}))


def test_what_the_run_leaves_out_or_risks_is_said(tmp_path, tiny_llama, pairs_file, capsys):
    from preftune_test_data import write_jsonl

    long_prompt = {"prompt": "word " * 200, "chosen": " yes", "rejected": " no"}
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [long_prompt, long_prompt | {"chosen": " sure"}])
    train(make_config(tmp_path, tiny_llama, pairs_file, model={"dtype": "float16"},
                      data={"eval": str(eval_file)}, train={"batch_size": 5, "max_steps": 1}))
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "1 of the 16 training pairs sit out each epoch (too few for another step of 5)" in out
    assert "none of the 2 eval pairs is left after tokenization (2 prompt longer than data.max_length)" in out
    assert "model.dtype float16 trains the float16 weights themselves, without loss scaling" in out


def test_eval_every_without_eval_pairs_is_said(tmp_path, tiny_llama, pairs_file, capsys):
    train(make_config(tmp_path, tiny_llama, pairs_file, train={"max_steps": 1, "eval_every": 1}))
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert ("train.eval_every is 1, but no eval pairs are given (data.eval or data.eval_fraction), so no "
            "evaluation will run") in out


def test_eval_split_reads_the_held_out_split_of_the_training_data_set(tmp_path, tiny_llama, capsys):
    import datasets
    from preftune_test_data import PAIRS

    rows = [dict(r) for r in PAIRS for _ in range(4)]
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(PAIRS[:3])}).save_to_disk(str(folder))
    train(make_config(tmp_path, tiny_llama, folder, data={"eval": str(folder), "eval_split": "test"},
                      train={"max_steps": 1}))
    out = "".join(capsys.readouterr().out.split())
    assert f"data:16rowsreadfrom{folder},split'train'(train)" in out
    assert f"data:3rowsreadfrom{folder},split'test'(eval)" in out


def test_eval_sources_report_rows_read_kept_and_skipped(tmp_path, tiny_llama, pairs_file, capsys):
    from preftune_test_data import PAIRS, write_jsonl

    same = {"prompt": "Q?", "chosen": " yes", "rejected": " yes"}
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [*PAIRS, same])
    train(make_config(tmp_path, tiny_llama, pairs_file, data={"eval": str(eval_file)}))
    out = "".join(capsys.readouterr().out.split())  # rich wraps long lines anywhere
    assert f"data:5rowsreadfrom{eval_file}(eval),4kept,skipped:1chosen==rejected" in out
    assert f"data:16rowsreadfrom{pairs_file}(train),16kept,skipped:none" in out


@pytest.mark.parametrize("texts, message", [
    (["a different corpus makes a smaller vocabulary"], "has another tokenizer than the policy"),
    (None, "has another tokenizer than the policy"),  # as many tokens, other ids
])
def test_a_reference_with_another_tokenizer_is_one_sentence(tmp_path, tiny_llama, pairs_file, texts, message):
    """It used to stop the first step with 'IndexError: index out of range in self' (a smaller
    vocabulary), or to train on rewards that mean nothing (as many tokens, other ids)."""
    from preftune.demo.tiny import DEFAULT_CORPUS, save_tiny_model
    from preftune.errors import UserError

    corpus = texts or [line.upper() for line in DEFAULT_CORPUS]
    other = save_tiny_model(tmp_path / "other", "llama", texts=corpus, vocab_size=512 if texts is None else 300)
    cfg = make_config(tmp_path, tiny_llama, pairs_file, model={"reference_path": str(other)})
    with pytest.raises(UserError, match=f"the reference '{other}' \\(model.reference_path\\) {message}"):
        train(cfg)
    same = tmp_path / "same"
    same.mkdir()
    for file in Path(tiny_llama).iterdir():  # the policy's own model under another name: accepted
        (same / file.name).write_bytes(file.read_bytes())
    train(make_config(tmp_path, tiny_llama, pairs_file, out="ok", model={"reference_path": str(same)}))


def test_pairs_longer_than_the_models_positions_are_refused_at_start(tmp_path, tiny_model_factory, pairs_file,
                                                                       capsys):
    """A GPT-2 of 32 learned positions, data.max_length 64: the first forward stopped with an
    IndexError traceback from the position embedding (an eval pair only at the first evaluation).
    Packed rows restart positions at each sequence, so a packed row longer than 32 trains."""
    from preftune_test_data import write_jsonl

    from preftune.errors import UserError

    short = tiny_model_factory("gpt2", hidden_size=32, max_positions=32)
    long_pair = {"prompt": "Tell me a story.", "rejected": " No.",
                 "chosen": " The quick brown fox jumps over the lazy dog." * 4}
    for name, data in (("train", {"train": str(write_jsonl(tmp_path / "long.jsonl", [long_pair] * 4))}),
                       ("eval", {"eval": str(write_jsonl(tmp_path / "eval.jsonl", [long_pair]))})):
        with pytest.raises(UserError) as caught:
            train(make_config(tmp_path, short, pairs_file, data=data))
        where = tmp_path / ("long.jsonl" if name == "train" else "eval.jsonl")
        assert re.fullmatch(rf"{re.escape(str(where))}, line 1: the pair runs to \d+ tokens, more than the 32 "
                            rf"positions of model.path {re.escape(str(short))} \(max_position_embeddings in "
                            r"its config.json\); set data.max_length to 32 or less\.", str(caught.value)), name
        assert not (tmp_path / "run").exists()
    capsys.readouterr()
    train(make_config(tmp_path, short, pairs_file, data={"max_length": 32, "packing": "on"}))
    assert "packing each micro-batch into one row" in capsys.readouterr().out


@pytest.mark.parametrize("optim, message", [
    # clip_grad_norm_ scales by max_norm / norm: a negative norm turned every step into ascent.
    ({"max_grad_norm": -1.0}, "key 'optim.max_grad_norm': Input should be greater than or equal to 0"),
    # 0 / (sqrt(0) + 0): the weights a step gave no gradient (unseen tokens' embeddings) became NaN.
    ({"eps": 0.0}, "key 'optim.eps': Input should be greater than 0"),
    # torch's ValueError traceback came once the model and the reference's log-probs were ready.
    ({"betas": [0.9, 1.0]}, "key 'optim.betas': [0.9, 1.0]: each of AdamW's two decay rates is at least 0 and "
                            "below 1"),
])
def test_optimizer_settings_that_wreck_or_stop_a_run_are_refused_by_the_config(tmp_path, optim, message):
    from preftune.errors import UserError

    with pytest.raises(UserError) as caught:
        make_config(tmp_path, "model", "data.jsonl", optim=optim)
    assert message in str(caught.value)
    make_config(tmp_path, "model", "data.jsonl", optim={"max_grad_norm": 0.0})  # 0: no clipping, as null


@pytest.mark.parametrize("reference", ["copy", "precompute"])
def test_pairs_longer_than_the_references_positions_are_refused(tmp_path, tiny_model_factory, reference):
    """model.reference_path with fewer positions than the policy (the policy's are checked first):
    the precompute, or the first step, stopped with an IndexError traceback."""
    from preftune_test_data import write_jsonl

    from preftune.errors import UserError

    policy = tiny_model_factory("gpt2", hidden_size=32, max_positions=64)
    short = tiny_model_factory("gpt2", hidden_size=32, max_positions=32)
    pair = {"prompt": "Tell me a story.", "rejected": " No.",
            "chosen": " The quick brown fox jumps over the lazy dog." * 3}
    data = write_jsonl(tmp_path / "long.jsonl", [pair] * 4)
    cfg = make_config(tmp_path, policy, data, model={"reference_path": str(short), "reference": reference})
    with pytest.raises(UserError, match=rf"^{re.escape(str(data))}, line 1: the pair runs to \d+ tokens, more than the "
                                        rf"32 positions of model.reference_path {re.escape(str(short))} "
                                        r"\(max_position_embeddings in its config.json\); set data.max_length to 32 "
                                        r"or less\.$"):
        train(cfg)
