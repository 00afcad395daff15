"""Every data format, every bad-row case, and the tokenization rules."""

import json
import re
from pathlib import Path

import pytest
from preftune_test_data import PAIRS, deny_reading, write_jsonl, write_multi_config_folder

from preftune.config import DataConfig
from preftune.data.collate import collate_pairs, epoch_order, micro_batches
from preftune.data.io import decode_text, load_pairs
from preftune.data.schema import PreferencePair
from preftune.data.tokenize import TokenizedPair, tokenize_pair, tokenize_pairs, truncate_pair
from preftune.errors import UserError

CONVERSATION = {
    "prompt": [{"role": "user", "content": "Name a fast animal."}],
    "chosen": [{"role": "assistant", "content": "The cheetah."}],
    "rejected": [{"role": "assistant", "content": "A snail."}],
}


# ------------------------------------------------------------------ formats


def test_jsonl_json_csv_parquet_and_saved_dataset_load_the_same_pairs(tmp_path):
    import datasets

    write_jsonl(tmp_path / "d.jsonl", PAIRS)
    (tmp_path / "d.json").write_text(json.dumps(PAIRS))
    ds = datasets.Dataset.from_list(PAIRS)
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    expected = [(r["prompt"], r["chosen"], r["rejected"]) for r in PAIRS]
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet", "saved", "saved_dict"):
        loaded = load_pairs(str(tmp_path / name))
        assert [(p.prompt, p.chosen, p.rejected) for p in loaded.pairs] == expected, name


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".json.bz2", ".csv.xz"])
def test_compressed_files_load_and_a_damaged_one_is_named(tmp_path, suffix):
    import bz2
    import gzip
    import lzma

    import datasets

    compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[Path(suffix).suffix]
    plain = tmp_path / ("d" + suffix.rsplit(".", 1)[0])
    if plain.suffix == ".csv":
        datasets.Dataset.from_list(PAIRS).to_csv(str(plain), index=False)
    elif plain.suffix == ".json":
        plain.write_text(json.dumps(PAIRS))
    else:
        write_jsonl(plain, PAIRS)
    packed = tmp_path / ("d" + suffix)
    packed.write_bytes(compress(plain.read_bytes()))
    loaded = load_pairs(str(packed))
    assert [(p.prompt, p.chosen, p.rejected) for p in loaded.pairs] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in PAIRS]
    packed.write_bytes(packed.read_bytes()[:-8])
    with pytest.raises(UserError, match=rf"d{re.escape(suffix)}: not a readable"):
        load_pairs(str(packed))


def test_a_folder_of_data_files_like_a_hub_download_is_read_by_split(tmp_path, monkeypatch):
    # A data set downloaded from the Hub: parquet shards named by split, no save_to_disk files.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # stays without a copy
    rows = [dict(r, score_chosen=8.0) for r in PAIRS]
    (tmp_path / "snap" / "data").mkdir(parents=True)
    (tmp_path / "snap" / "README.md").write_text("---\nlicense: mit\n---\n")
    for name, part in (("train-00000-of-00002", rows[:2]), ("train-00001-of-00002", rows[2:]),
                       ("test-00000-of-00001", rows[:1])):
        datasets.Dataset.from_list(part).to_parquet(str(tmp_path / "snap" / "data" / f"{name}.parquet"))
    train = load_pairs(str(tmp_path / "snap"))
    assert [p.chosen for p in train.pairs] == [r["chosen"] for r in PAIRS]
    assert train.pairs[0].metadata == {"score_chosen": 8.0}
    assert [p.chosen for p in load_pairs(str(tmp_path / "snap"), "test").pairs] == [PAIRS[0]["chosen"]]
    with pytest.raises(UserError, match=r"snap has no split 'validation': .* its splits are only 'train', "
                                         r"'test' \(data/.*; .* or choose one of its splits"):
        load_pairs(str(tmp_path / "snap"), "validation")
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.arrow"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty is a folder neither written by datasets.save_to_disk nor"):
        load_pairs(str(tmp_path / "empty"))


def test_a_folder_of_data_files_names_a_bad_row_by_file_and_line_and_takes_shards_of_other_columns(tmp_path):
    """Streamed through `datasets`, a malformed line crashed with pyarrow's ArrowInvalid naming
    no file, and a shard with one more column (a score) with a CastError."""
    import datasets

    (tmp_path / "snap" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(PAIRS[:2]).to_parquet(str(tmp_path / "snap" / "data" / "train-00000-of-00002.parquet"))
    scored = [dict(r, score=1.0) for r in PAIRS[2:]]
    datasets.Dataset.from_list(scored).to_parquet(str(tmp_path / "snap" / "data" / "train-00001-of-00002.parquet"))
    loaded = load_pairs(str(tmp_path / "snap"))
    assert [p.chosen for p in loaded.pairs] == [r["chosen"] for r in PAIRS]
    assert loaded.pairs[-1].metadata == {"score": 1.0}
    assert loaded.pairs[0].origin == f"{tmp_path / 'snap' / 'data' / 'train-00000-of-00002.parquet'}, row 0"
    (tmp_path / "lines" / "data").mkdir(parents=True)
    write_jsonl(tmp_path / "lines" / "data" / "test.jsonl", PAIRS[:1])
    with open(tmp_path / "lines" / "data" / "test.jsonl", "a") as f:
        f.write('{"prompt": "x", "chosen": "y",\n')
    with pytest.raises(UserError, match=r"lines/data/test\.jsonl, line 2: malformed JSON"):
        load_pairs(str(tmp_path / "lines"), "test")


def test_a_damaged_shard_of_a_format_read_by_datasets_is_one_sentence_naming_the_folder_and_split(tmp_path):
    import pyarrow as pa

    (tmp_path / "snap" / "data").mkdir(parents=True)
    table = pa.Table.from_pylist(PAIRS)
    good, damaged = (tmp_path / "snap" / "data" / f"train-0000{i}-of-00002.arrow" for i in (0, 1))
    with pa.ipc.new_stream(str(good), table.schema) as writer:
        writer.write_table(table)
    assert [p.chosen for p in load_pairs(str(tmp_path / "snap")).pairs] == [r["chosen"] for r in PAIRS]
    damaged.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(UserError, match=rf"snap \(train\), row {len(PAIRS)}: its data files cannot be read "
                                        r"\(.*\); check the files of that split"):
        load_pairs(str(tmp_path / "snap"))


def test_a_folder_of_run_folders_says_it_is_no_data_set_and_names_the_files_read(tmp_path):
    """It said only "has no split 'train', only 'test'": datasets had taken a/eval.json as the
    test split of a data set, and nothing said so."""
    for run, name in (("a", "eval.json"), ("b", "metrics.jsonl"), ("c", "eval-2.json")):
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / name).write_text('{"step": 1}\n')
    with pytest.raises(UserError) as info:
        load_pairs(str(tmp_path / "runs"), setting="--data")
    assert str(info.value) == (
        f"{tmp_path / 'runs'} has no split 'train': it is no datasets.save_to_disk folder (no "
        "dataset_dict.json or state.json), and as a folder of data files its splits are only 'test' "
        "(a/eval.json, c/eval-2.json); point --data at a data file (.csv, .json, .jsonl, .parquet), "
        "a save_to_disk folder or a folder of data files with a 'train' split, or choose one of its "
        "splits (data.split, data.eval_split for data.eval, or --split).")


def test_a_folder_of_runs_with_checkpoints_names_the_files_that_are_no_data(tmp_path):
    """A checkpoint's training_state.pt matches datasets' 'train' file names, and being of no
    data format, load_dataset stopped with its own words in brackets ("Couldn't infer the same
    data file format for all splits. Got {NamedSplit('train'): (None, {}), ...}")."""
    step = tmp_path / "runs" / "a" / "checkpoints" / "step-000010"
    step.mkdir(parents=True)
    for name in ("training_state.pt", "model.safetensors", "config.json", "manifest.json"):
        (step / name).write_bytes(b"\x80\x02")
    (tmp_path / "runs" / "a" / "eval.json").write_text('{"step": 1}\n')
    with pytest.raises(UserError) as info:
        load_pairs(str(tmp_path / "runs"), setting="the file given to `preftune data inspect`")
    assert str(info.value) == (
        f"{tmp_path / 'runs'} is no data set: it is no datasets.save_to_disk folder (no dataset_dict.json "
        "or state.json), and as a folder of data files its splits would be 'train' "
        "(a/checkpoints/step-000010/training_state.pt) and 'test' (a/eval.json), though "
        "a/checkpoints/step-000010/training_state.pt is no data file; point the file given to `preftune "
        "data inspect` at the data file itself (.csv, .json, .jsonl, .parquet), a save_to_disk folder or "
        "a folder holding only data files.")


def test_data_config_picks_one_of_the_configs_a_folders_readme_declares(tmp_path, tokenizer):
    """There was no way to choose: load_dataset's 'Config name is missing' ended as 'a folder
    neither written by datasets.save_to_disk nor readable as data files'."""
    from preftune_test_data import make_config
    from rich.console import Console

    from preftune.train import prepare_data

    repo = write_multi_config_folder(tmp_path / "repo")
    assert [p.chosen for p in load_pairs(str(repo), config="de").pairs] == [r["chosen"] for r in PAIRS[3:]]
    assert [p.chosen for p in load_pairs(str(repo), "test", config="en").pairs] == [PAIRS[2]["chosen"]]
    with pytest.raises(UserError) as caught:
        load_pairs(str(repo), setting="data.train")
    assert str(caught.value) == (f"{repo} has several configs (subsets), 'de', 'en', and none is its default; "
                                 "choose one with data.config.")
    with pytest.raises(UserError) as caught:
        load_pairs(str(repo), "test", setting="data.eval", config="fr")
    assert str(caught.value) == f"{repo} has no config 'fr', only 'de', 'en'; choose one of them with data.eval_config."
    # Sources without configs refuse one rather than ignore it.
    (tmp_path / "plain").mkdir()
    write_jsonl(tmp_path / "plain" / "train.jsonl", PAIRS)
    for source in (tmp_path / "plain", tmp_path / "plain" / "train.jsonl"):
        with pytest.raises(UserError, match=rf"^{re.escape(str(source))} has no configs \(subsets\), so "
                                            r"data.config 'en' cannot be chosen from it; remove data.config"):
            load_pairs(str(source), setting="data.train", config="en")
    # Through a run's settings: train on en's train split, evaluate on de.
    config = make_config(tmp_path, "unused", repo, data={"config": "en", "eval": str(repo), "eval_config": "de"})
    train, evaluated, _ = prepare_data(config, tokenizer, Console(quiet=True))
    assert (len(train), len(evaluated)) == (2, len(PAIRS) - 3)


def test_data_inspect_reads_the_config_data_config_names(tmp_path, tiny_llama):
    from typer.testing import CliRunner

    from preftune.cli import app

    repo = write_multi_config_folder(tmp_path / "repo")
    result = CliRunner().invoke(app, ["data", "inspect", str(repo), "--model", str(tiny_llama), "--data-config", "en"])
    assert result.exit_code == 0 and "2 rows, 2 usable" in " ".join(result.output.split()), result.output
    result = CliRunner().invoke(app, ["data", "inspect", str(repo), "--model", str(tiny_llama)])
    assert result.exit_code != 0
    assert "'de', 'en', and none is its default; choose one with --data-config." in " ".join(result.output.split())


def test_data_eval_config_is_another_config_of_the_training_set_and_needs_data_eval():
    DataConfig(train="org/prefs", eval="org/prefs", config="en", eval_config="de")
    with pytest.raises(ValueError, match="same split"):
        DataConfig(train="org/prefs", eval="org/prefs", config="en", eval_config="en")
    with pytest.raises(ValueError, match="data.eval_config is 'de', but data.eval is not set"):
        DataConfig(train="org/prefs", eval_config="de")


@pytest.mark.parametrize("datasets_private_list", [True, False])
def test_a_folder_mixing_data_formats_names_the_files_load_dataset_would_leave_out(tmp_path, monkeypatch,
                                                                                   datasets_private_list):
    """load_dataset reads a folder's most common format only: the JSONL shard beside two Parquet
    shards was dropped without a word, and training ran on three of the four pairs. The check
    keeps working should datasets rename its private list of extensions."""
    import datasets

    if not datasets_private_list:
        monkeypatch.delattr(datasets.packaged_modules, "_ALL_ALLOWED_EXTENSIONS")

    (tmp_path / "snap" / "data").mkdir(parents=True)
    for i, rows in enumerate((PAIRS[:2], PAIRS[2:3])):
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "snap" / "data" / f"train-{i}.parquet"))
    write_jsonl(tmp_path / "snap" / "data" / "train-2.jsonl", PAIRS[3:])
    datasets.Dataset.from_list(PAIRS[:1]).to_parquet(str(tmp_path / "snap" / "data" / "test.parquet"))
    # A split all of one format is read.
    assert [p.chosen for p in load_pairs(str(tmp_path / "snap"), "test").pairs] == [PAIRS[0]["chosen"]]
    with pytest.raises(UserError) as caught:
        load_pairs(str(tmp_path / "snap"), setting="data.train")
    assert str(caught.value) == (
        f"{tmp_path / 'snap'} mixes data formats in split 'train': load_dataset reads only data/train-0.parquet, "
        "data/train-1.parquet and leaves out data/train-2.jsonl; list the files to read in data.train, or move "
        "the others out of the folder.")
    # `eval pairs --data` and `data inspect FILE` take one file: they cannot list several.
    with pytest.raises(UserError, match=r"leaves out data/train-2\.jsonl; point --data at one of those files, "
                                        r"or move the others out of the folder\.$"):
        load_pairs(str(tmp_path / "snap"), setting="--data")
    # A README's configs name their files: those are read, whatever their formats.
    (tmp_path / "snap" / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n---\n")
    assert [p.chosen for p in load_pairs(str(tmp_path / "snap")).pairs] == [r["chosen"] for r in PAIRS]


def test_a_missing_split_of_a_saved_dataset_dict_names_the_ones_there(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(PAIRS)
    datasets.DatasetDict({"train_prefs": ds, "test_prefs": ds}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_pairs(str(tmp_path / "dd"), "test_prefs").pairs) == len(PAIRS)
    with pytest.raises(UserError, match=r"dd has no split 'train', only 'train_prefs', 'test_prefs'; choose one"):
        load_pairs(str(tmp_path / "dd"))


@pytest.mark.parametrize("saved", [False, True])
def test_a_split_named_for_data_without_splits_is_refused_not_ignored(tmp_path, saved):
    """`data.eval_split: test` on one file would otherwise evaluate on the whole file: the
    training data, if that is what the file holds."""
    import datasets

    source = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    if saved:  # a single Dataset written by save_to_disk has no splits either
        datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "one"))
        source = tmp_path / "one"
    assert len(load_pairs(str(source)).pairs) == len(PAIRS)  # the default split reads it all
    with pytest.raises(UserError, match=r"has no splits, so split 'test' cannot be chosen from it; "
                                        r"remove the split"):
        load_pairs(str(source), "test")


def test_an_eval_file_beside_training_data_of_another_split_is_read_whole(tmp_path, tokenizer):
    """data.split: train_prefs (HuggingFaceH4's layout) carries over to data.eval when
    data.eval_split is unset; an eval file has no splits, and was refused with advice to remove
    the split that training needs. A split named for the eval file itself is still refused."""
    import datasets
    from preftune_test_data import make_config
    from rich.console import Console

    from preftune.train import prepare_data

    ds = datasets.Dataset.from_list(PAIRS)
    datasets.DatasetDict({"train_prefs": ds, "test_prefs": ds}).save_to_disk(str(tmp_path / "dd"))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", PAIRS[:3])
    datasets.Dataset.from_list(PAIRS[:2]).save_to_disk(str(tmp_path / "one"))
    for source, n in ((eval_file, 3), (tmp_path / "one", 2)):
        config = make_config(tmp_path, "unused", tmp_path / "dd", data={"split": "train_prefs", "eval": str(source)})
        console = Console(record=True, width=1000)
        train, evaluated, _ = prepare_data(config, tokenizer, console)
        assert (len(train), len(evaluated)) == (len(PAIRS), n)
        # The split read is said; "(train)" names the role, and said alone it read as the split.
        said = console.export_text()
        assert f"rows read from {tmp_path / 'dd'}, split 'train_prefs' (train)" in said
        assert f"rows read from {source} (eval)" in said
    config = make_config(tmp_path, "unused", tmp_path / "dd", data={"split": "train_prefs", "eval": str(eval_file),
                                                                    "eval_split": "test_prefs"})
    with pytest.raises(UserError, match=r"eval.jsonl has no splits, so split 'test_prefs' cannot be chosen"):
        prepare_data(config, tokenizer, Console(quiet=True))


def test_training_warns_once_about_duplicate_rows_and_eval_pairs_it_trains_on(tmp_path, tokenizer):
    """Training said nothing while `data inspect` counted duplicates: each copy is trained on (the
    pair weighs 2x or more), and a data.eval pair that is also a training row inflates eval/."""
    from preftune_test_data import make_config
    from rich.console import Console

    from preftune.train import prepare_data

    rows = PAIRS + [PAIRS[1], PAIRS[0], PAIRS[1]]  # lines 5-7 repeat lines 2, 1, 2
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    other = {"prompt": "Question: Name a planet.\nAnswer:", "chosen": " Mars.", "rejected": " The moon."}
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [other, PAIRS[2]])
    console = Console(record=True, width=1000)
    train, evaluated, _ = prepare_data(make_config(tmp_path, "unused", train_file, data={"eval": str(eval_file)}),
                                       tokenizer, console)
    assert (len(train), len(evaluated)) == (len(rows), 2)  # said, not dropped
    said = console.export_text()
    assert said.count("duplicate row") == 1 and said.count("data.train also has") == 1
    assert (f"data: data.train has 3 duplicate rows, the same prompt, chosen and rejected as an earlier row "
            f"(the first: {train_file}, line 5 repeats {train_file}, line 2); training keeps every copy, so "
            "those pairs weigh 2x or more. Remove the duplicates from the data, or keep them if the extra "
            "weight is on purpose") in said
    assert (f"data: data.train also has 1 pair of the 2 in data.eval, the same prompt, chosen and rejected "
            f"(the first: {eval_file}, line 2 is {train_file}, line 3); the policy is trained on them, so their "
            "eval/ numbers are optimistic. Remove them from data.train or from data.eval") in said
    # Unique rows, and an eval file of other pairs: nothing to say.
    write_jsonl(train_file, PAIRS)
    write_jsonl(eval_file, [other])
    console = Console(record=True, width=1000)
    prepare_data(make_config(tmp_path, "unused", train_file, data={"eval": str(eval_file)}), tokenizer, console)
    said = console.export_text()
    assert "duplicate" not in said and "data.train also has" not in said, said


def test_rows_that_tokenize_differently_are_not_duplicates():
    """Rows with one text but other tools, template arguments or *_truncated flags tokenize
    differently (tokenize.py), yet the duplicate-rows warning and `data inspect` called them copies."""
    from preftune.data.repeats import repeated_rows

    def row(prompt, chosen, rejected, **metadata):
        return PreferencePair(prompt, chosen, rejected, origin=f"line {metadata.pop('line')}", metadata=metadata)

    ask = [{"role": "user", "content": "Weather in Paris?"}]
    good, bad = [{"role": "assistant", "content": "Sunny."}], [{"role": "assistant", "content": "No idea."}]
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    rows = [row(ask, good, bad, line=1), row(ask, good, bad, line=2, tools=[tool]),
            row(ask, good, bad, line=3, chat_template_kwargs={"enable_thinking": False}),
            row("Q:", " yes", " no", line=4), row("Q:", " yes", " no", line=5, chosen_truncated=True)]
    assert repeated_rows(rows) == []
    # Truly identical rows still are copies, ids and scores aside; tools as JSON text are the same tools.
    copies = [row(ask, good, bad, line=6, tools=json.dumps([tool]), id="x"),
              row("Q:", " yes", " no", line=7, chosen_truncated=False, score=3)]
    assert [(r.origin, e.origin) for r, e in repeated_rows(rows + copies)] == [("line 6", "line 2"),
                                                                              ("line 7", "line 4")]


def test_json_lines_under_a_json_name_are_read_line_by_line(tmp_path):
    # Hub data sets often name JSON Lines files train.json; datasets reads them, so do we.
    path = write_jsonl(tmp_path / "train.json", PAIRS)
    assert [p.chosen for p in load_pairs(str(path)).pairs] == [r["chosen"] for r in PAIRS]
    path.write_text(json.dumps(PAIRS[0]) + "\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(UserError, match=r"train.json, line 2: malformed JSON"):
        load_pairs(str(path))


def test_json_lines_of_one_row_under_a_json_name_are_that_row(tmp_path):
    """Dataset.to_json writes a one-pair data set as one object: refused as 'must hold a list of rows'."""
    import datasets

    datasets.Dataset.from_list(PAIRS[:1]).to_json(str(tmp_path / "one.json"))
    loaded = load_pairs(str(tmp_path / "one.json"))
    assert [(p.chosen, p.origin) for p in loaded.pairs] == [(PAIRS[0]["chosen"], f"{tmp_path / 'one.json'}, line 1")]
    (tmp_path / "other.json").write_text('{"rows": []}')
    with pytest.raises(UserError, match=r"other.json: a .json data file must hold a list of rows;"):
        load_pairs(str(tmp_path / "other.json"))
    conversation = tmp_path / "conversation.json"
    conversation.write_text(json.dumps(CONVERSATION))
    assert load_pairs(str(conversation)).pairs[0].chosen == CONVERSATION["chosen"]
    (tmp_path / "columns.json").write_text(json.dumps(datasets.Dataset.from_list(PAIRS).to_dict()))
    with pytest.raises(UserError, match=r"columns.json: a .json data file must hold a list of rows \(this one "
                                        r"holds a dict of columns\)"):
        load_pairs(str(tmp_path / "columns.json"))


def test_one_row_object_written_over_several_lines_is_that_row(tmp_path):
    """json.dump(row, f, indent=2): read line by line as JSON Lines, it was 'line 1: malformed JSON'."""
    path = tmp_path / "one.json"
    path.write_text(json.dumps(PAIRS[0], indent=2))
    loaded = load_pairs(str(path))
    assert [(p.chosen, p.origin) for p in loaded.pairs] == [(PAIRS[0]["chosen"], f"{path}, row 0")]


def test_hub_id_offline_fails_with_one_sentence_naming_the_key_and_what_to_do():
    # HF_HUB_OFFLINE=1 (conftest): it said 'could not load the hub data set ...: Couldn't reach
    # ... on the Hub (OfflineModeIsEnabled); check the id and the network', naming no key.
    import datasets

    with pytest.raises(UserError) as caught:
        load_pairs("nobody/no-such-set", setting="data.train")
    assert str(caught.value) == (
        f"data.train 'nobody/no-such-set' is no file or folder here and not in the datasets cache "
        f"{datasets.config.HF_DATASETS_CACHE}, and HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE=1) keeps it from "
        "the Hub; load it once where there is network (load_dataset('nobody/no-such-set') with this HF_HOME), "
        "or point data.train at a local file, a save_to_disk folder or a downloaded snapshot folder.")


def test_a_missing_split_of_a_hub_data_set_is_not_blamed_on_the_network(monkeypatch):
    import datasets

    def no_such_split(spec, split=None, **kwargs):
        raise ValueError(f'Unknown split "{split}". Should be one of [\'train_prefs\', \'test_prefs\'].')

    monkeypatch.setattr(datasets, "load_dataset", no_such_split)
    with pytest.raises(UserError, match=r"hub data set 'someone/prefs' has no split 'train' \(Unknown split") as info:
        load_pairs("someone/prefs")
    assert "train_prefs" in str(info.value) and "network" not in str(info.value)


def test_missing_local_file_is_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_pairs(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz"])
def test_a_data_file_without_read_permission_is_one_sentence(tmp_path, monkeypatch, name):
    """It was a PermissionError traceback (and for d.jsonl.gz 'not a readable .gz file; check
    the download')."""
    path = tmp_path / name
    path.write_bytes(b"")
    deny_reading(monkeypatch, path)
    with pytest.raises(UserError, match=f"^{re.escape(str(path))} cannot be read: no permission to read it; "
                                        r"make it readable for this user \(chmod a\+r\)"):
        load_pairs(str(path))


def test_a_missing_data_file_names_the_setting_that_gave_it(tmp_path, tiny_llama):
    """The sentence said 'check data.train / data.eval' to every command, `data inspect` too."""
    from preftune_test_data import make_config
    from rich.console import Console
    from typer.testing import CliRunner

    from preftune.cli import app
    from preftune.train import prepare_data

    missing, data = tmp_path / "nope.jsonl", write_jsonl(tmp_path / "d.jsonl", PAIRS)
    for config, setting in ((make_config(tmp_path, tiny_llama, missing), "data.train"),
                            (make_config(tmp_path, tiny_llama, data, data={"eval": str(missing)}), "data.eval")):
        with pytest.raises(UserError, match=f"{re.escape(str(missing))} does not exist; check {setting}.$"):
            prepare_data(config, None, Console(quiet=True))
    result = CliRunner().invoke(app, ["data", "inspect", str(missing), "--model", str(tiny_llama)])
    assert result.exit_code == 2
    assert "does not exist; check the file given to `preftune data inspect`." in " ".join(result.output.split())


def test_implicit_prompt_is_the_common_prefix_cut_at_a_word(tmp_path):
    rows = [{"chosen": "The movie was great fun.", "rejected": "The movie was grim."}]
    pair = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", rows))).pairs[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ("The movie was", " great fun.", " grim.")


@pytest.mark.parametrize("chosen, rejected, prompt", [
    # parted between words: the prompt keeps all it shares (the newline, "A:"), as in TRL; cut
    # back to the last whitespace, "\nA:" was trained as the start of both responses
    ("Q: sky?\nA:Blue.", "Q: sky?\nA:Purple.", "Q: sky?\nA:"),
    ("Q: sky?\n\nBlue.", "Q: sky?\n\nPurple.", "Q: sky?\n\n"),
    # parted mid-word after a newline: the word starts the responses, the newline stays
    ("Q: hi?\nHello there.", "Q: hi?\nHelp me.", "Q: hi?\n"),
])
def test_an_implicit_prompt_keeps_what_precedes_the_word_the_responses_part_in(tmp_path, chosen, rejected, prompt):
    pair = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", [{"chosen": chosen, "rejected": rejected}]))).pairs[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, chosen[len(prompt):], rejected[len(prompt):])


def test_an_implicit_prompt_with_nothing_shared_is_refused_not_trained_empty(tmp_path):
    # The prompt is then most likely under another name, kept as metadata and never trained on.
    rows = [{"question": "Is the sky blue?", "chosen": " Yes, on a clear day.", "rejected": " No."}]
    with pytest.raises(UserError) as caught:
        load_pairs(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert str(caught.value) == (f"{tmp_path / 'd.jsonl'}, line 1: no 'prompt', and chosen and rejected share no "
                                 "start to take as one; add a 'prompt' field (\"\" for none).")
    rows = [{"prompt": "", "chosen": " Yes, on a clear day.", "rejected": " No."}]  # the way to say none
    pair = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", rows))).pairs[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ("", " Yes, on a clear day.", " No.")


def test_conversational_explicit_and_implicit(tmp_path):
    implicit = {"chosen": CONVERSATION["prompt"] + CONVERSATION["chosen"],
                "rejected": CONVERSATION["prompt"] + CONVERSATION["rejected"]}
    loaded = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", [CONVERSATION, implicit]))).pairs
    for pair in loaded:
        assert pair.conversational
        assert pair.prompt == CONVERSATION["prompt"] and pair.chosen == CONVERSATION["chosen"]


QUESTION = {"role": "user", "content": "What is 2+2?"}
ULTRAFEEDBACK = {  # HuggingFaceH4/ultrafeedback_binarized: the prompt as text AND inside the conversations
    "prompt": "What is 2+2?", "prompt_id": "abc",
    "chosen": [QUESTION, {"role": "assistant", "content": "4"}],
    "rejected": [QUESTION, {"role": "assistant", "content": "5"}],
    "messages": [QUESTION, {"role": "assistant", "content": "4"}], "score_chosen": 8.0, "score_rejected": 3.0,
}


@pytest.mark.parametrize("row, prompt, chosen, rejected", [
    (ULTRAFEEDBACK, [QUESTION], [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]),
    # the replies alone beside a text prompt: the text is the user's message
    ({"prompt": "What is 2+2?", "chosen": [{"role": "assistant", "content": "4"}],
      "rejected": [{"role": "assistant", "content": "5"}]},
     [QUESTION], [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]),
    # the prompt messages beside whole conversations that start with them: the prompt was read
    # twice, its user turn trained on as part of the response
    (dict(ULTRAFEEDBACK, prompt=[{"role": "system", "content": "Be brief."}, QUESTION],
          chosen=[{"role": "system", "content": "Be brief."}] + ULTRAFEEDBACK["chosen"],
          rejected=[{"role": "system", "content": "Be brief."}] + ULTRAFEEDBACK["rejected"]),
     [{"role": "system", "content": "Be brief."}, QUESTION], [{"role": "assistant", "content": "4"}],
     [{"role": "assistant", "content": "5"}]),
    # Anthropic HH: whole dialogues as text, the prompt implicit
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: Four.",
      "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: No idea."},
     "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant:", " Four.", " No idea."),
])
def test_hub_layouts_become_prompt_chosen_rejected(tmp_path, row, prompt, chosen, rejected):
    pair = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", [row]))).pairs[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, chosen, rejected)
    assert set(pair.metadata) == set(row) - {"prompt", "chosen", "rejected"}  # kept, never trained on


def test_a_conversational_response_with_no_text_but_a_tool_call_is_kept(tmp_path):
    call = [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}]
    pair = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", [dict(CONVERSATION, chosen=call)]))).pairs[0]
    assert pair.chosen == call


def test_prompt_messages_beside_a_conversation_that_is_only_them_are_refused(tmp_path):
    row = dict(CONVERSATION, chosen=CONVERSATION["prompt"], rejected=CONVERSATION["prompt"] + CONVERSATION["rejected"])
    with pytest.raises(UserError, match=r"line 1: chosen holds only the prompt's messages, no response"):
        load_pairs(str(write_jsonl(tmp_path / "d.jsonl", [row])))


def test_a_text_prompt_that_the_conversations_do_not_hold_is_refused(tmp_path):
    row = dict(ULTRAFEEDBACK, prompt="Something else entirely")
    with pytest.raises(UserError, match=r"d.jsonl, line 1: field 'prompt' is text found in none of the messages"):
        load_pairs(str(write_jsonl(tmp_path / "d.jsonl", [row])))


# ------------------------------------------------------------------ bad rows


@pytest.mark.parametrize("row, message", [
    ({"prompt": "x", "rejected": "b"}, "line 2: missing field 'chosen'"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, "line 2: field 'chosen' must be a string"),
    ({"prompt": "x", "chosen": "  ", "rejected": "b"}, "line 2: field 'chosen' is empty"),
    ({"prompt": ["x"], "chosen": "a", "rejected": "b"}, "line 2: field 'prompt' is a message list"),
    ({"prompt": "x", "chosen": [{"role": "assistant"}], "rejected": [{"role": "a", "content": "b"}]},
     r"line 2: chosen\[0\] must be an object"),
    ([1, 2], "line 2: expected an object"),
    # A conversational response with no content trained on the template's empty turn.
    (dict(CONVERSATION, chosen=[{"role": "assistant", "content": " "}]), "line 2: field 'chosen' is empty"),
    ({"chosen": CONVERSATION["prompt"] + CONVERSATION["chosen"],
      "rejected": CONVERSATION["prompt"] + [{"role": "assistant", "content": ""}]}, "line 2: field 'rejected' is empty"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=message) as info:
        load_pairs(str(path))
    assert str(path) in str(info.value)


def test_a_field_written_twice_in_a_row_or_header_names_where(tmp_path):
    # json.loads would keep the second 'chosen' and drop the first without a word.
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + '{"prompt": "x", "chosen": " a", "rejected": " b", "chosen": " c"}\n')
    with pytest.raises(UserError) as caught:
        load_pairs(str(path))
    assert str(caught.value) == f"{path}, line 2: field 'chosen' is written twice; keep one."
    path = tmp_path / "bad.json"  # a JSON list
    path.write_text('[{"prompt": "x", "chosen": " a", "rejected": " b", "chosen": " c"}]')
    with pytest.raises(UserError) as caught:
        load_pairs(str(path))
    assert str(caught.value) == f"{path}: a row writes field 'chosen' twice; keep one."
    path = tmp_path / "bad.csv"
    path.write_text("prompt,chosen,rejected,chosen\nx, a, b, c\n")
    with pytest.raises(UserError) as caught:
        load_pairs(str(path))
    assert str(caught.value) == f"{path}, line 1: column 'chosen' appears twice in the header; keep one."


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(UserError, match=r"bad.jsonl, line 2: malformed JSON"):
        load_pairs(str(path))


def test_a_data_file_not_in_utf8_names_the_files_own_line_and_byte(tmp_path):
    """After a byte-order mark the decoder counts from the byte after it: a bad byte at the start
    of line 3 was reported on line 2."""
    body = b"prompt,chosen,rejected\nx,good,bad\n\xe9t\xe9,good,bad\n"
    for bom, byte in ((b"", 34), (b"\xef\xbb\xbf", 37)):
        path = tmp_path / "d.csv"
        path.write_bytes(bom + body)
        with pytest.raises(UserError) as caught:
            load_pairs(str(path))
        assert str(caught.value) == (f"{path}, line 3: not UTF-8 text (invalid continuation byte at byte "
                                     f"{byte}); re-save it as UTF-8."), bom
    # JSON Lines, decoded line by line, said 'line 3: not valid UTF-8; save the file as UTF-8.'
    # without the byte or the reason: it now says what .json and .csv files say.
    body = b'{"prompt": "x", "chosen": "good", "rejected": "bad"}\n\n{"prompt": "\xe9t\xe9"}\n'
    for bom, byte in ((b"", 66), (b"\xef\xbb\xbf", 69)):
        path = tmp_path / "d.jsonl"
        path.write_bytes(bom + body)
        with pytest.raises(UserError) as caught:
            load_pairs(str(path))
        assert str(caught.value) == (f"{path}, line 3: not UTF-8 text (invalid continuation byte at byte "
                                     f"{byte}); re-save it as UTF-8."), bom
        with pytest.raises(UserError) as whole_file:
            decode_text(bom + body, path)  # as a .json or .csv file is read
        assert str(caught.value) == str(whole_file.value)


def test_a_csv_row_spanning_lines_is_named_by_all_of_them(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\n"Write a poem",fine,bad\n"Two\nlines",,"also\nbad"\n')
    with pytest.raises(UserError, match=r"d.csv, lines 3-5: .*chosen"):
        load_pairs(str(path))
    path.write_text('prompt,chosen,rejected\nx,good,bad,extra\n')
    with pytest.raises(UserError, match=r"d.csv, line 2: more values than header columns"):
        load_pairs(str(path))


def test_a_conversation_written_to_csv_as_text_is_refused_not_trained_on_as_text(tmp_path):
    """Dataset.to_csv writes a message list as its Python repr; it was read as a text prompt and
    text responses, so the model trained on "[{'role': 'assistant', ...}]"."""
    import datasets

    datasets.Dataset.from_list([CONVERSATION]).to_csv(str(tmp_path / "conv.csv"), index=False)
    with pytest.raises(UserError, match=r"conv.csv, line 2: field 'prompt' holds a list of messages written out "
                                        r"as text .*; save the data as JSONL \(Dataset.to_json\) or Parquet"):
        load_pairs(str(tmp_path / "conv.csv"))
    (tmp_path / "json.csv").write_text('prompt,chosen,rejected\nHi,"[{""role"": ""assistant"", ""content"": '
                                       '""yes""}]",no\n')
    with pytest.raises(UserError, match=r"json.csv, line 2: field 'chosen' holds a list of messages"):
        load_pairs(str(tmp_path / "json.csv"))
    (tmp_path / "text.csv").write_text('prompt,chosen,rejected\nList it,"[{1, 2}]",[{]\n')  # text that only looks so
    assert load_pairs(str(tmp_path / "text.csv")).pairs[0].chosen == "[{1, 2}]"


def test_identical_responses_are_skipped_and_counted(tmp_path):
    rows = PAIRS + [{"prompt": "p", "chosen": "same", "rejected": "same"}]
    loaded = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert len(loaded.pairs) == len(PAIRS)
    assert loaded.skipped == {"chosen == rejected": 1}
    assert loaded.rows_read == len(rows)


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="holds no preference rows"):
        load_pairs(str(tmp_path / "empty.jsonl"))


# ------------------------------------------------------------------ tokenization


@pytest.fixture(scope="module")
def tokenizer(tiny_model_factory):
    from preftune.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model_factory("llama")))


def test_standard_tokenization_matches_the_common_rule(tokenizer):
    pair = PreferencePair("Question: sky?\nAnswer:", " Blue.", " Red, I think.")
    tok = tokenize_pair(pair, tokenizer)
    assert tok.prompt_ids == tokenizer(pair.prompt)["input_ids"]
    full = tokenizer(pair.prompt + pair.chosen)["input_ids"]
    assert tok.prompt_ids + tok.chosen_ids == full + [tokenizer.eos_token_id]
    assert tokenizer.decode(tok.rejected_ids[:-1]) == " Red, I think."
    assert tok.rejected_ids[-1] == tokenizer.eos_token_id


def test_prompt_merging_into_completion_keeps_a_shared_prompt(tokenizer):
    # " bro" + "wn" merge into " brown" across the boundary; chosen and rejected still share
    # prompt ids, which stop before the merged token, and each completion starts with it.
    pair = PreferencePair("The quick bro", "wn fox", "wn dog")
    tok = tokenize_pair(pair, tokenizer)
    assert tok.prompt_ids == tokenizer(pair.prompt)["input_ids"][:-2]  # the case is really exercised
    assert tokenizer.decode(tok.chosen_ids) == " brown fox<|eos|>"
    for completion in (pair.chosen, pair.rejected):
        full = tokenizer(pair.prompt + completion)["input_ids"]
        assert full[: len(tok.prompt_ids)] == tok.prompt_ids


def test_a_prompt_end_merging_into_the_completion_is_warned_about_not_dropped(tokenizer):
    import warnings

    merging = PreferencePair("The quick bro", "wn fox", "wn dog", origin="d.jsonl, line 1")
    clean = PreferencePair("Question: sky?\nAnswer:", " Blue.", " Red.")
    with pytest.warns(UserWarning, match=r"1 of 2 pairs: the tokenized prompt is not where .*\(d.jsonl, line 1\)"):
        kept, counts = tokenize_pairs([merging, clean], tokenizer, DataConfig(train="x"))
    assert len(kept) == 2 and not counts  # kept, as TRL keeps them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_pairs([clean], tokenizer, DataConfig(train="x"))


def test_conversational_tokenization_uses_the_chat_template(tokenizer):
    pair = PreferencePair(CONVERSATION["prompt"], CONVERSATION["chosen"], CONVERSATION["rejected"])
    tok = tokenize_pair(pair, tokenizer)
    assert tokenizer.decode(tok.prompt_ids).endswith("<|assistant|>\n")
    assert tokenizer.decode(tok.chosen_ids) == "The cheetah.<|eos|>\n"  # the template closes the turn


def test_conversational_rows_for_a_tokenizer_without_a_chat_template_name_the_row(tokenizer):
    """It said 'the data is conversational but the tokenizer has no chat template', naming no row."""
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    pair = PreferencePair(CONVERSATION["prompt"], CONVERSATION["chosen"], CONVERSATION["rejected"],
                          origin="d.jsonl, line 3")
    with pytest.raises(UserError, match=r"^d.jsonl, line 3: the row is conversational \(message lists\) but the "
                                        r"model's tokenizer has no chat template"):
        tokenize_pair(pair, plain)


def test_truncation_prompt_first_then_completions():
    pair = TokenizedPair(list(range(10)), [100, 101, 102, 103, 104, 105], [200, 201])
    kept, status = truncate_pair(pair, max_length=12, max_prompt_length=None, mode="keep_end")
    # overflow 4: the prompt gives up 4 tokens (still above its budget of 6), keeping its end
    assert status == "truncated" and kept.prompt_ids == list(range(4, 10)) and kept.chosen_ids == pair.chosen_ids
    kept, _ = truncate_pair(pair, max_length=12, max_prompt_length=None, mode="keep_start")
    assert kept.prompt_ids == list(range(6))
    long = TokenizedPair(list(range(10)), list(range(100, 108)), [200, 201])
    kept, _ = truncate_pair(long, max_length=11, max_prompt_length=None, mode="keep_end")
    # overflow 7 but the prompt budget is 11 // 2 = 5: prompt -> 5 tokens, completions cut to 6
    assert kept.prompt_ids == list(range(5, 10)) and kept.chosen_ids == list(range(100, 106))
    assert kept.rejected_ids == [200, 201]
    kept, _ = truncate_pair(long, max_length=11, max_prompt_length=8, mode="keep_end")
    assert kept.prompt_ids == list(range(2, 10)) and kept.chosen_ids == [100, 101, 102]
    assert truncate_pair(pair, 10, None, "keep_end") == (None, "prompt longer than data.max_length")
    assert truncate_pair(pair, 20, None, "keep_end") == (pair, None)


def test_responses_cut_to_the_start_they_share_are_dropped_and_counted(tokenizer):
    """Kept, such a pair was one response twice: no gradient from DPO, and a wrong answer in
    rewards/accuracies for ever, so a run's accuracy could not reach 1."""
    pair = TokenizedPair(list(range(10)), [100, 101, 102, 7], [100, 101, 102, 8, 9])
    assert truncate_pair(pair, 12, 9, "keep_end") == (None, "chosen == rejected once cut to data.max_length")
    assert truncate_pair(pair, 13, 9, "keep_end")[1] == "truncated"
    start = " The answer to that question, as far as anyone knows, is"
    pairs = [PreferencePair("Hi", start + " yes.", start + " no."), PreferencePair("Hi", " yes", " no")]
    kept, counts = tokenize_pairs(pairs, tokenizer, DataConfig(train="x", max_length=8))
    assert len(kept) == 1 and counts == {"chosen == rejected once cut to data.max_length": 1}


def test_prompt_longer_than_max_length_is_dropped_and_counted(tokenizer):
    pairs = [PreferencePair("word " * 50, " yes", " no"), PreferencePair("Hi", " yes", " no")]
    kept, counts = tokenize_pairs(pairs, tokenizer, DataConfig(train="x", max_length=16))
    assert len(kept) == 1 and counts["prompt longer than data.max_length"] == 1


# ------------------------------------------------------------------ batches


def test_collate_masks_prompt_and_padding():
    a = TokenizedPair([1, 2], [3, 4, 5], [6], index=0)
    b = TokenizedPair([7], [8], [9, 10], index=1)
    batch = collate_pairs([a, b], pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0], [1, 2, 6, 0, 0], [7, 9, 10, 0, 0]]
    assert batch.attention_mask.tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert batch.completion_mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 0, 0]]
    assert batch.indices == [0, 1]


def test_epoch_order_is_seeded_and_covers_every_pair_once():
    lengths = list(range(100))
    first = epoch_order(lengths, 8, seed=0, epoch=0, group_by_length=True)
    assert first == epoch_order(lengths, 8, seed=0, epoch=0, group_by_length=True)
    assert first != epoch_order(lengths, 8, seed=0, epoch=1, group_by_length=True)
    flat = [i for step in first for i in step]
    assert len(flat) == len(set(flat)) == 96  # 12 full steps; 4 pairs, drawn at random, sit out
    spread = sum(max(lengths[i] for i in s) - min(lengths[i] for i in s) for s in first) / len(first)
    assert spread < 30  # grouped: far below the ~80 of random steps


@pytest.mark.parametrize("group_by_length", [True, False])
def test_the_pairs_left_out_of_an_epoch_change_every_epoch_and_are_not_the_shortest(group_by_length):
    # 40 pairs in steps of 16: 8 sit out each epoch. Grouping by length must not make them the
    # 8 shortest every time, or those pairs would never be trained on.
    lengths = [10 + (7 * i) % 190 for i in range(40)]
    left_out = []
    for epoch in range(6):
        seen = {i for step in epoch_order(lengths, 16, seed=0, epoch=epoch, group_by_length=group_by_length)
                for i in step}
        assert len(seen) == 32
        left_out.append(set(range(40)) - seen)
    assert len({frozenset(s) for s in left_out}) == 6
    assert set().union(*left_out) != set(sorted(range(40), key=lambda i: lengths[i])[:8])
    assert len(set().union(*left_out)) > 20  # over 6 epochs, most pairs sit out at some point


def test_micro_batches_split_a_step_across_ranks():
    step = list(range(8))
    assert micro_batches(step, 0, 1, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert micro_batches(step, 1, 2, 2) == [[1, 3], [5, 7]]


def test_length_bias_counts_longer_shorter_and_equal_and_names_a_strong_one():
    from preftune.data.inspect import length_bias

    assert length_bias([], []) is None
    even = length_bias([5, 3, 4, 4], [3, 5, 4, 4])
    assert even == ("chosen longer than rejected in 1 pair (25%), shorter in 1 (25%), as long in 2; "
                    "mean difference +0.0 tokens")
    biased = length_bias([9, 8, 7, 2], [3, 3, 3, 3])
    assert biased.startswith("chosen longer than rejected in 3 pairs (75%), shorter in 1 (25%), as long "
                             "in 0; mean difference +3.5 tokens: a length bias the policy will learn "
                             "(longer responses)")


def test_data_inspect_reports_counts_lengths_and_an_example(tmp_path, tiny_llama):
    from typer.testing import CliRunner

    from preftune.cli import app

    rows = PAIRS + [{"prompt": "p", "chosen": "same", "rejected": "same"},
                    {"prompt": "word " * 80, "chosen": " yes", "rejected": " no"}, PAIRS[0]]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    result = CliRunner().invoke(app, ["data", "inspect", str(path), "--model", str(tiny_llama),
                                      "--max-length", "64"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())  # rich wraps lines at the terminal width
    assert f"{len(rows)} rows, {len(rows) - 1} usable" in out
    assert "skipped 1: chosen == rejected" in out
    assert "1 prompt longer than data.max_length" in out
    assert "1 row repeats an earlier one (same prompt, chosen and rejected)" in out
    assert "chosen longer than rejected in " in out
    for title in ("prompt length", "chosen length", "rejected length", "total length"):
        assert title in out
    one = CliRunner().invoke(app, ["data", "inspect", str(write_jsonl(tmp_path / "one.jsonl", PAIRS[:1])),
                                   "--model", str(tiny_llama)])
    assert one.exit_code == 0 and "1 row, 1 usable" in " ".join(one.output.split()), one.output  # not "1 rows"
    assert "[chosen]" in out and "[rejected]" in out


@pytest.mark.parametrize("option, said", [(["--truncation", "keep_middle"], "error: --truncation 'keep_middle': "
                                                                          "Input should be 'keep_end' or 'keep_start'."),
                                           (["--max-length", "0"], "error: --max-length 0: Input should be greater than 1.")])
def test_data_inspect_names_a_bad_option_in_one_sentence(tmp_path, tiny_llama, option, said):
    from typer.testing import CliRunner

    from preftune.cli import app

    path = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    result = CliRunner().invoke(app, ["data", "inspect", str(path), "--model", str(tiny_llama), *option])
    assert result.exit_code == 2, result.output
    assert " ".join(result.output.split()) == said



def test_data_inspect_names_an_empty_file_argument_as_its_own(tiny_llama):
    """DataConfig refuses an empty data.train; here that is the FILE argument, not a '--train' option."""
    from typer.testing import CliRunner

    from preftune.cli import app

    result = CliRunner().invoke(app, ["data", "inspect", " ", "--model", str(tiny_llama)])
    assert result.exit_code == 2, result.output
    assert " ".join(result.output.split()) == "error: FILE ' ': an empty name; give a data file, folder or hub id."

def _rows_with_pairs_per_prompt(prompts, counts, conversational):
    """`counts[i]` distinct pairs for `prompts[i]`, the prompts interleaved as a real file has them."""
    rows = []
    for k in range(max(counts)):
        for prompt, n in zip(prompts, counts):
            if k < n:
                chosen, rejected = f" Good answer {k}.", f" Bad answer {k}."
                if conversational:
                    chosen = [{"role": "assistant", "content": chosen.strip()}]
                    rejected = [{"role": "assistant", "content": rejected.strip()}]
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


@pytest.mark.parametrize("prompts, conversational", [
    (["Question: Name a fast animal.\nAnswer:", "Question: Name a slow animal.\nAnswer:",
      "Question: Name a fast animal.\nAnswer: "], False),  # a trailing space makes another prompt
    # message lists compared whole: the third starts with the first's message but goes on
    ([[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "2+2?"}],
      [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
       {"role": "user", "content": "2+2?"}]], True),
])
def test_data_inspect_counts_prompts_and_their_pairs_as_the_held_out_split_does(tmp_path, tokenizer, prompts,
                                                                                 conversational):
    from io import StringIO

    from rich.console import Console

    from preftune.data.heldout import count_prompts
    from preftune.data.inspect import inspect_file

    path = write_jsonl(tmp_path / "d.jsonl", _rows_with_pairs_per_prompt(prompts, [1, 2, 4], conversational))
    console = Console(file=StringIO(), width=1000)
    result = inspect_file(str(path), tokenizer, DataConfig(train=str(path)), console)
    out = console.file.getvalue()
    assert (result["usable"], result["prompts"], result["prompts_with_several_pairs"],
            result["most_pairs_per_prompt"]) == (7, 3, 2, 4)
    assert "3 distinct prompts, 2 with more than one pair (at most 4 pairs for one prompt)" in out
    assert ("if you hold out part of this data for evaluation (data.eval_fraction), set "
            "data.eval_fraction_by: prompt") in out and "held-out evaluation is optimistic" in out
    assert result["prompts"] == count_prompts(load_pairs(str(path)).pairs)  # the units eval_fraction_by: prompt draws


def test_data_inspect_gives_no_split_advice_when_every_prompt_has_one_pair(tmp_path, tokenizer):
    from io import StringIO

    from rich.console import Console

    from preftune.data.inspect import inspect_file

    path = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    console = Console(file=StringIO(), width=1000)
    result = inspect_file(str(path), tokenizer, DataConfig(train=str(path)), console)
    out = console.file.getvalue()
    assert (result["prompts"], result["prompts_with_several_pairs"], result["most_pairs_per_prompt"]) == (4, 0, 1)
    assert "4 distinct prompts, 0 with more than one pair (at most 1 pair for one prompt)" in out
    assert "data.eval_fraction_by" not in out


@pytest.mark.parametrize("extra, message", [
    ({"tools": "[{not json"}, "field 'tools' is text but not JSON; give the list of tool schemas, as a list or "
                              "as JSON text."),
    ({"chat_template_kwargs": "enable_thinking"}, "field 'chat_template_kwargs' must be an object of template "
                                                  'arguments (e.g. {"enable_thinking": false}), got str.'),
])
def test_unreadable_template_arguments_of_a_row_name_it(tmp_path, tokenizer, extra, message):
    pair = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", [dict(CONVERSATION, **extra)]))).pairs[0]
    with pytest.raises(UserError) as caught:
        tokenize_pair(pair, tokenizer)
    assert str(caught.value) == f"{tmp_path / 'd.jsonl'}, line 1: {message}"
