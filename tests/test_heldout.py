"""data.eval_fraction's held-out pairs are kept in the run folder (eval_heldout.jsonl): read back
they are exactly the pairs held out, `eval pairs` on them reproduces the run's eval/ numbers, a
resumed run refuses a file that no longer matches its data, and prompts shared with training
are counted."""

import io
import json
import random
from collections import Counter

import pytest
import yaml
from preftune_test_data import torch_threads, write_jsonl
from rich.console import Console
from typer.testing import CliRunner

import preftune.train as train_module
from preftune.cli import app
from preftune.data.heldout import check_heldout, hold_out, write_heldout
from preftune.data.io import load_pairs
from preftune.distributed import DistContext
from preftune.errors import UserError
from preftune.modeling import load_tokenizer

# Each row a prompt of its own (the overlap warning has nothing to count), with metadata that
# must come back, and implicit prompts: the file has to write out what was split off.
ROWS = [{"chosen": f"Question: What is {i} plus {i}?\nAnswer: {2 * i}.",
         "rejected": f"Question: What is {i} plus {i}?\nAnswer: I do not know.",
         "pair_id": f"q{i}", "score": i / 2} for i in range(16)]


def squash(text: str) -> str:
    return "".join(text.split())  # rich wraps long lines anywhere


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def scored(pair) -> str:
    return json.dumps([pair.prompt, pair.chosen, pair.rejected, pair.pair_id, pair.metadata], sort_keys=True)


def write_run_config(folder, model, data, **train):
    raw = {"model": {"path": str(model)}, "data": {"train": str(data), "max_length": 64, "eval_fraction": 0.25},
           "optim": {"lr": 1e-2},
           "train": {"batch_size": 4, "max_steps": 2, "seed": 0, "progress": False, "report": False,
                     "output_dir": str(folder / "run"), **train}}
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def heldout_run(tmp_path_factory, tiny_llama):
    """One 2-step run holding out 4 of ROWS, evaluated at its end; the raw pairs that training
    tokenized, train split first, are caught on their way in."""
    folder = tmp_path_factory.mktemp("heldout")
    data = write_jsonl(folder / "D.jsonl", ROWS)
    seen = []

    def catch(pairs, *args, **kwargs):
        seen.append(list(pairs))
        return tokenize_pairs(pairs, *args, **kwargs)

    tokenize_pairs = train_module.tokenize_pairs
    with pytest.MonkeyPatch.context() as patch, torch_threads(1):
        patch.setattr(train_module, "tokenize_pairs", catch)
        result = cli("train", write_run_config(folder, tiny_llama, data))
    assert result.exit_code == 0, result.output
    return {"run": folder / "run", "data": data, "output": result.output, "train": seen[0], "eval": seen[1]}


def test_the_held_out_pairs_are_written_and_read_back_exactly(heldout_run):
    run, path = heldout_run["run"], heldout_run["run"] / "eval_heldout.jsonl"
    assert f"data:4pairsheldoutbydata.eval_fractionwrittento{path}" in squash(heldout_run["output"])
    written = load_pairs(str(path)).pairs
    assert [scored(p) for p in written] == [scored(p) for p in heldout_run["eval"]]
    assert len(written) == 4 and not list(run.glob(".eval_heldout.jsonl.*"))  # no temporary file left
    # With the training pairs they are every input row, each once (the rows are all different).
    every_row = [scored(p) for p in load_pairs(str(heldout_run["data"])).pairs]
    together = [scored(p) for p in heldout_run["train"] + written]
    assert Counter(together) == Counter(every_row) and len(set(every_row)) == 16
    assert "optimistic" not in heldout_run["output"]  # no prompt on both sides


def test_eval_pairs_on_the_file_reproduces_the_run_last_eval(heldout_run, tmp_path):
    run = heldout_run["run"]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_eval = [line for line in logged if "eval/loss" in line][-1]
    assert last_eval["step"] == 2 and abs(last_eval["eval/loss"] - 0.6931) > 1e-3  # trained, not ln 2
    result = cli("eval", "pairs", "--model", run / "final", "--data", run / "eval_heldout.jsonl",
                 "--out", tmp_path)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["n_pairs"] == 4
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert record[f"eval/{key}"] == pytest.approx(last_eval[f"eval/{key}"], rel=1e-4, abs=1e-5), key


def test_prompts_on_both_sides_of_the_split_are_counted(tmp_path, tiny_llama, pairs_file):
    """pairs_file repeats each of 4 prompts 4 times: all 4 held-out pairs share a prompt with
    training (the split would have to take one prompt's 4 copies to avoid it). Nothing is dropped."""
    from preftune.config import validate_config

    config = validate_config(yaml.safe_load(write_run_config(tmp_path, tiny_llama, pairs_file).read_text()))
    out = io.StringIO()
    train, evaluate, held_out = train_module.prepare_data(config, load_tokenizer(str(tiny_llama)),
                                                          Console(file=out, soft_wrap=True))
    assert "data: 4 of the 4 held-out pairs have a prompt that training pairs have too" in out.getvalue()
    assert "optimistic" in out.getvalue()
    assert "hold out whole prompts with data.eval_fraction_by: prompt" in out.getvalue()  # the fix
    assert (len(train), len(evaluate), len(held_out)) == (12, 4, 4)


def test_a_resume_refuses_a_held_out_file_its_data_no_longer_gives(tmp_path, tiny_llama, one_torch_thread):
    """An edited held-out row leaves the training pairs, and so the checkpoint's data fingerprint,
    as they were: only the held-out file can tell that eval/ would now score other pairs."""
    data = write_jsonl(tmp_path / "D.jsonl", ROWS)
    config = write_run_config(tmp_path, tiny_llama, data, max_steps=1, save_every=1)
    assert cli("train", config).exit_code == 0
    path = tmp_path / "run" / "eval_heldout.jsonl"
    before = path.read_text()
    held = json.loads(before.splitlines()[0])["pair_id"]
    edited = [{**row, "rejected": row["rejected"] + " Maybe."} if row["pair_id"] == held else row for row in ROWS]
    write_jsonl(data, edited)
    result = cli("train", config, "--resume", "train.max_steps=2")
    assert result.exit_code == 2, result.output
    assert squash(f"{path} does not hold the pairs data.eval_fraction holds out of data.train now") \
        in squash(result.output)
    assert f"delete{path.name}toevaluate" in squash(result.output) and "Traceback" not in result.output
    assert path.read_text() == before
    write_jsonl(data, ROWS)  # the data the run started with: resumed
    result = cli("train", config, "--resume", "train.max_steps=2")
    assert result.exit_code == 0, result.output
    assert path.read_text() == before


TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
CHAT_ROWS = [{"prompt": [{"role": "user", "content": f"Weather in city {i}?"}],
              "chosen": [{"role": "assistant", "content": "Sunny."}],
              "rejected": [{"role": "assistant", "content": "No idea."}], "pair_id": f"w{i}"} for i in range(3)]


def test_a_resume_notices_a_held_out_rows_tools_or_template_arguments_changed(tmp_path):
    """A conversational row's tools and chat_template_kwargs reach the chat template (tokenize.py),
    so a held-out row whose tools were edited is scored as another pair; the check compared the
    texts and *_truncated flags only, and the resumed run went on with eval/ on other pairs."""
    rows = [{**CHAT_ROWS[0], "tools": [TOOL]}, {**CHAT_ROWS[1], "chat_template_kwargs": {"enable_thinking": False}},
            CHAT_ROWS[2]]
    write_heldout(tmp_path, load_pairs(str(write_jsonl(tmp_path / "D.jsonl", rows))).pairs)
    single = DistContext()
    for changed in ({**rows[0], "tools": [TOOL, {**TOOL, "function": {**TOOL["function"], "name": "time"}}]},
                    {**rows[0], "tools": []},
                    {**rows[1], "chat_template_kwargs": {"enable_thinking": True}}):
        edited = [changed if row["pair_id"] == changed["pair_id"] else row for row in rows]
        held_out = load_pairs(str(write_jsonl(tmp_path / "E.jsonl", edited))).pairs
        with pytest.raises(UserError, match="does not hold the pairs data.eval_fraction holds out"):
            check_heldout(tmp_path, held_out, single)
    # The same pairs pass, whatever else changed (a score, tools written as JSON text).
    same = [{**rows[0], "tools": json.dumps([TOOL]), "score": 1.5}, *rows[1:]]
    check_heldout(tmp_path, load_pairs(str(write_jsonl(tmp_path / "E.jsonl", same))).pairs, single)


def test_a_fresh_run_holding_nothing_out_deletes_an_earlier_runs_file(tmp_path, tiny_llama, one_torch_thread):
    """--overwrite of a run that held pairs out, by one that holds none out: the old file would
    otherwise sit beside the new run's files as if this run had held those pairs out."""
    data = write_jsonl(tmp_path / "D.jsonl", ROWS)
    config = write_run_config(tmp_path, tiny_llama, data, max_steps=1)
    assert cli("train", config).exit_code == 0
    path = tmp_path / "run" / "eval_heldout.jsonl"
    assert path.is_file()
    # A run that evaluates on that very file (data.eval) keeps it: it is this run's data.
    result = cli("train", config, "--overwrite", "data.eval_fraction=0", f"data.eval={path}")
    assert result.exit_code == 0, result.output
    assert path.is_file() and "deleted" not in squash(result.output).replace("overwrite:deleted", "")
    result = cli("train", config, "--overwrite", "data.eval_fraction=0")
    assert result.exit_code == 0, result.output
    assert not path.exists()
    assert squash(f"data: deleted {path}, an earlier run's held-out pairs") in squash(result.output)
    assert "kept:" not in result.output  # the overwrite line does not call it kept, then delete it
    # A run that holds pairs out again writes its own file, and --overwrite does not call it kept.
    result = cli("train", config, "--overwrite")
    assert result.exit_code == 0, result.output
    assert path.is_file() and "kept:" not in result.output


# ------------------------------------------------- data.eval_fraction_by: pair (rows) or prompt


def old_hold_out(pairs, fraction, seed):
    """The row split as it was before data.eval_fraction_by: runs, tests and the demo rely on it."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = set(order[:max(1, round(len(order) * fraction))])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def prompt_of(pair) -> str:
    return json.dumps(pair.prompt, sort_keys=True)


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.5, 0.8])
def test_holding_out_by_prompt_keeps_each_prompt_on_one_side(pairs_file, fraction):
    pairs = load_pairs(str(pairs_file)).pairs  # 4 prompts, 4 pairs each
    # Message lists as prompts too, compared whole: 3 more prompts of 2 pairs each.
    pairs += load_pairs(str(write_jsonl(pairs_file.parent / "chat.jsonl", [
        {"prompt": [{"role": "user", "content": f"Say {word}."}], "chosen": [{"role": "assistant", "content": word}],
         "rejected": [{"role": "assistant", "content": f"No {n}."}]}
        for word in ("yes", "no", "maybe") for n in range(2)]))).pairs
    prompts = {prompt_of(p) for p in pairs}
    assert len(prompts) == 7
    row = {id(p): i for i, p in enumerate(pairs)}  # repeated rows are equal: tell them apart by identity
    splits = set()
    for seed in range(8):
        train, held = hold_out(pairs, fraction, seed, "prompt")
        assert not {prompt_of(p) for p in train} & {prompt_of(p) for p in held}
        assert len({prompt_of(p) for p in held}) == max(1, round(fraction * 7))
        rows = [[row[id(p)] for p in side] for side in (train, held)]
        assert sorted(rows[0] + rows[1]) == list(range(len(pairs)))  # every row used exactly once
        assert rows == [sorted(side) for side in rows]  # each side in the data's order
        again = hold_out(pairs, fraction, seed, "prompt")
        assert [[row[id(p)] for p in side] for side in again] == rows  # the same seed, the same split
        splits.add(tuple(rows[1]))
    assert len(splits) > 1  # the seed picks the prompts


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.5])
def test_holding_out_by_pair_is_the_old_row_split(pairs_file, fraction, seed):
    pairs = load_pairs(str(pairs_file)).pairs
    row = {id(p): i for i, p in enumerate(pairs)}  # repeated rows are equal: tell them apart by identity
    expected = [[row[id(p)] for p in side] for side in old_hold_out(pairs, fraction, seed)]
    for split in (hold_out(pairs, fraction, seed, "pair"), hold_out(pairs, fraction, seed)):
        assert [[row[id(p)] for p in side] for side in split] == expected


def test_holding_out_the_only_prompt_is_refused(pairs_file):
    pairs = [p for p in load_pairs(str(pairs_file)).pairs if "ice cream" in p.prompt]
    with pytest.raises(UserError) as caught:
        hold_out(pairs, 0.25, 0, "prompt")
    assert str(caught.value) == (
        "data.eval_fraction_by: prompt needs two or more distinct prompts, but all 4 pairs of data.train have "
        "the same one, so holding it out would leave nothing to train on; set data.eval_fraction_by: pair, "
        "or give data.eval a file of other prompts.")


def test_a_run_holding_out_whole_prompts_writes_them_and_warns_of_no_overlap(tmp_path, tiny_llama, pairs_file,
                                                                           one_torch_thread):
    """pairs_file's 4 prompts of 4 pairs each, a quarter held out: one prompt with its 4 pairs.
    A resume holds out the same ones, and one that would split by rows instead is refused."""
    config = write_run_config(tmp_path, tiny_llama, pairs_file, max_steps=1, save_every=1)
    result = cli("train", config, "data.eval_fraction_by=prompt")
    assert result.exit_code == 0, result.output
    path = tmp_path / "run" / "eval_heldout.jsonl"
    held = load_pairs(str(path)).pairs
    assert len(held) == 4 and len({prompt_of(p) for p in held}) == 1
    assert Counter(scored(p) for p in held) == Counter(scored(p) for p in load_pairs(str(pairs_file)).pairs
                                                       if prompt_of(p) == prompt_of(held[0]))
    assert f"data:1prompt(4pairs)heldoutbydata.eval_fractionwrittento{path}" in squash(result.output)
    assert "data:12trainpairs,4evalpairs" in squash(result.output)
    assert "optimistic" not in result.output and "have a prompt that training pairs have too" not in result.output
    before = path.read_text()
    result = cli("train", config, "--resume", "train.max_steps=2")  # c.yaml alone splits by pair
    assert result.exit_code == 2, result.output
    assert "data.eval_fraction_by'prompt'(now'pair')" in squash(result.output)
    result = cli("train", config, "--resume", "train.max_steps=2", "data.eval_fraction_by=prompt")
    assert result.exit_code == 0, result.output
    assert path.read_text() == before
