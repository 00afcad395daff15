"""What `load_config` makes of what users actually type: YAML's booleans, typos, keys that clash."""

from __future__ import annotations

import pytest

from preftune.config import LossConfig, OptimConfig, load_config, validate_config
from preftune.errors import UserError

REQUIRED = ["model.path=some/model", "data.train=pairs.jsonl"]


@pytest.mark.parametrize("written, expected", [("on", "on"), ("off", "off"), ("'off'", "off"),
                                               ("true", "on"), ("false", "off"), ("auto", "auto")])
def test_packing_on_and_off_unquoted(tmp_path, written, expected):
    # YAML 1.1 reads a bare on / off as a boolean; the documented values must work as typed.
    path = tmp_path / "config.yaml"
    path.write_text(f"model: {{path: m}}\ndata: {{train: t.jsonl, packing: {written}}}\n")
    assert load_config(path).data.packing == expected
    assert load_config(None, REQUIRED + [f"data.packing={written}"]).data.packing == expected


def test_an_unknown_key_gets_the_close_match_and_the_section_keys():
    with pytest.raises(UserError) as caught:
        load_config(None, REQUIRED + ["model.refrence=copy"])
    message = str(caught.value)
    assert "unknown key 'model.refrence' (did you mean 'model.reference'?)" in message
    assert "the keys of model are path, reference_path, reference," in message


def test_a_bad_key_set_on_the_command_line_names_the_override_not_the_file(tmp_path):
    # The user would search the YAML for a typo that is only on the command line.
    path = tmp_path / "config.yaml"
    path.write_text("model: {path: m}\ndata: {train: t.jsonl}\nloss: {beta: 0.1}\n")
    with pytest.raises(UserError) as caught:
        load_config(path, ["loss.bta=0.2", "optim.lr=1e-6"])
    assert str(caught.value).startswith("override 'loss.bta=0.2': unknown key 'loss.bta' (did you mean")
    with pytest.raises(UserError) as caught:
        load_config(path, ["loss.beta=abc"])
    assert str(caught.value).startswith("override 'loss.beta=abc': key 'loss.beta': Input should be a valid number")
    with pytest.raises(UserError) as caught:  # a key inside a section the override wrote whole
        load_config(path, ["model.reference_sync={every: 0}"])
    assert str(caught.value).startswith("override 'model.reference_sync={every: 0}': key "
                                        "'model.reference_sync.every': Input should be greater than 0")
    path.write_text("model: {path: m}\ndata: {train: t.jsonl}\nloss: {bta: 0.1}\n")
    with pytest.raises(UserError) as caught:  # in the file: the file is named
        load_config(path, ["optim.lr=1e-6"])
    assert str(caught.value).startswith(f"{path}: unknown key 'loss.bta'")


@pytest.mark.parametrize("override, said", [
    ("data.train=''", "key 'data.train': an empty name; give a data file, folder or hub id."),
    ("data.train=[pairs.jsonl, '']", "key 'data.train': an empty name; give a data file, folder or hub id."),
    ("data.train=[]", "key 'data.train': an empty list; name at least one data file, folder or hub id."),
    ("data.eval=' '", "key 'data.eval': an empty name; give a data file, folder or hub id."),
    ("model.path=''", "key 'model.path': an empty name; give a model folder or hub id."),
    ("model.reference_path=''", "key 'model.reference_path': an empty name; give a model folder or hub id."),
])
def test_an_empty_data_source_or_model_is_refused_at_the_config(override, said):
    # '' would be read as the current folder (data), a hub id (model.path) or no reference at all
    # (model.reference_path); [] as a run with no pairs and a garbled message.
    with pytest.raises(UserError) as caught:
        load_config(None, [*REQUIRED, override])
    assert str(caught.value) == f"override {override!r}: {said}"


def test_an_empty_loss_type_list_is_refused_at_the_config():
    # It validated, and the first step's backward failed with a traceback.
    with pytest.raises(UserError) as caught:
        load_config(None, [*REQUIRED, "loss.type=[]"])
    assert str(caught.value).startswith("override 'loss.type=[]': key 'loss.type': an empty list; name one or "
                                        "more of aot, aot_unpaired, apo_down,")


@pytest.mark.parametrize("overrides, said", [
    (["loss.type=[sigmoid]", "loss.weights=[-1]"],
     "override 'loss.weights=[-1]': key 'loss.weights': -1 is negative, and a negative weight maximises that "
     "loss (for a preference loss, training towards the rejected responses); use 0 or more."),
    (["loss.type=[sigmoid,sft]", "loss.weights=[1,-0.5]"],
     "override 'loss.weights=[1,-0.5]': key 'loss.weights': -0.5 is negative,"),
    (["loss.type=[sigmoid,sigmoid]"],
     "override 'loss.type=[sigmoid,sigmoid]': key 'loss.type': sigmoid: listed more than once; give each type "
     "once and put the sum of its weights in its loss.weights entry."),
])
def test_a_negative_loss_weight_or_a_repeated_loss_type_is_refused(overrides, said):
    """Both validated without a word: a negative weight turns DPO into gradient ascent on the
    preference, and a repeated type silently doubles its weight."""
    with pytest.raises(UserError) as caught:
        load_config(None, [*REQUIRED, *overrides])
    assert str(caught.value).startswith(said)


def test_a_loss_weight_of_zero_is_allowed():
    loss = load_config(None, [*REQUIRED, "loss.type=[sigmoid,sft]", "loss.weights=[1,0]"]).loss
    assert loss.type_weights == [1.0, 0.0]


def test_paths_starting_with_a_tilde_are_in_the_home_folder(tmp_path, monkeypatch):
    """YAML and overrides keep ~ as written: train.output_dir ~/runs/dpo made a folder named '~'
    in the current one, and a data file under ~ was 'not found' (model folders were expanded)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["model.path=~/model", "model.reference_path=~/ref", "data.train=[~/a.jsonl,org/data]",
                             "data.eval=~/e.jsonl", "train.output_dir=~/runs/dpo"])
    assert (cfg.model.path, cfg.model.reference_path) == (f"{tmp_path}/model", f"{tmp_path}/ref")
    assert (cfg.data.train, cfg.data.eval) == ([f"{tmp_path}/a.jsonl", "org/data"], f"{tmp_path}/e.jsonl")
    assert cfg.train.output_dir == f"{tmp_path}/runs/dpo"


def test_a_section_left_empty_takes_its_defaults(tmp_path):
    """`loss:` with its keys commented out was 'Input should be a valid dictionary or instance of
    LossConfig', though an override into the same empty section was accepted."""
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  path: m\ndata:\n  train: d.jsonl\nloss:\n  # beta: 0.2\noptim:\n")
    cfg = load_config(path)
    assert (cfg.loss, cfg.optim) == (LossConfig(), OptimConfig())
    path.write_text("model:\ndata:\n  train: d.jsonl\n")
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: missing required key 'model.path'."


def test_numbers_with_an_exponent_and_no_dot_are_numbers(tmp_path):
    """YAML 1.1 reads 1e3 as a string: `max_steps: 1e3` was 'unable to parse string as an integer'."""
    path = tmp_path / "c.yaml"
    path.write_text("model: {path: m}\ndata: {train: d.jsonl}\noptim: {lr: 5e-7}\ntrain: {max_steps: 1e3}\n")
    cfg = load_config(path, ["train.save_every=2E+2"])
    assert (cfg.optim.lr, cfg.train.max_steps, cfg.train.save_every) == (5e-7, 1000, 200)


@pytest.mark.parametrize("override, said", [
    ("train.save_every=yes", "key 'train.save_every': true is not a number; give a number, or null for none."),
    ("train.eval_every=true", "key 'train.eval_every': true is not a number; give a number, or null for none."),
    ("loss.beta=on", "key 'loss.beta': true is not a number; give a number."),
])
def test_a_yaml_boolean_is_no_number(override, said):
    """pydantic took true for 1: `save_every: yes` saved after every step."""
    with pytest.raises(UserError) as caught:
        load_config(None, [*REQUIRED, override])
    assert str(caught.value) == f"override {override!r}: {said}"
    assert load_config(None, [*REQUIRED, "train.report=no"]).train.report is False  # a boolean key takes one


@pytest.mark.parametrize("written, said", [
    ("loss: {weights: [true]}", "key 'loss.weights': entry 1, true, is not a number; give a number for each entry."),
    ("loss: {type: [sigmoid, sft], weights: [1, no]}",
     "key 'loss.weights': entry 2, false, is not a number; give a number for each entry."),
    ("optim: {betas: [false, 0.99]}", "key 'optim.betas': entry 1, false, is not a number; give a number for each entry."),
])
def test_a_yaml_boolean_in_a_list_of_numbers_is_no_number(tmp_path, written, said):
    """`loss.weights: [true]` was a weight of 1.0, `optim.betas: [false, 0.99]` a beta1 of 0."""
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{path: m}}\ndata: {{train: d.jsonl}}\n{written}\n")
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: {said}"
    assert load_config(None, [*REQUIRED, "loss.type=[sigmoid,sft]", "loss.weights=[1,0.5]"]).loss.weights == [1.0, 0.5]


def test_a_name_that_reads_as_a_number_is_text_where_only_text_goes(tmp_path):
    """train.output_dir=20241129 (a run named by its date) was 'Input should be a valid string'."""
    cfg = load_config(None, [*REQUIRED, "train.output_dir=20241129", "data.split=1e3"])
    assert (cfg.train.output_dir, cfg.data.split) == ("20241129", "1e3")  # as typed: no shell keeps quotes
    assert load_config(None, [*REQUIRED, "train.max_steps=5"]).train.max_steps == 5  # numbers stay numbers
    path = tmp_path / "c.yaml"
    path.write_text("model: {path: m}\ndata: {train: d.jsonl}\ntrain: {output_dir: 20241129}\n")
    with pytest.raises(UserError) as caught:  # in a file, the quotes are the way
        load_config(path)
    assert str(caught.value) == (f"{path}: key 'train.output_dir': 20241129 is read as a number; put it in "
                                 "quotes to give it as text ('20241129').")


@pytest.mark.parametrize("written", ["1e3", "017", "0x1F", "1_000", "1.50"])
def test_a_name_read_as_a_number_is_quoted_as_written(tmp_path, written):
    """The advice quoted the number YAML made of the name: one written 1e3 was to be given as '1000.0',
    017 as '15'."""
    advice = f"key 'train.output_dir': {written} is read as a number; put it in quotes to give it as text ('{written}')."
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{path: m}}\ndata: {{train: d.jsonl}}\ntrain:\n  output_dir: {written}  # a date\n")
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: {advice}"
    override = f"train={{output_dir: {written}, seed: 1}}"  # a whole section on the command line
    with pytest.raises(UserError) as caught:
        load_config(path, [override])
    assert str(caught.value) == f"override {override!r}: {advice}"


def test_a_number_where_text_goes_without_yaml_source_shows_no_made_up_text():
    # A dict given to the Python API: how the number was written is unknown, so it is not quoted.
    with pytest.raises(UserError) as caught:
        validate_config({"model": {"path": "m"}, "data": {"train": "d.jsonl"}, "train": {"output_dir": 1000.0}})
    assert str(caught.value) == ("config: key 'train.output_dir': read as the number 1000.0; put it in quotes, "
                                 "as written, to give it as text.")


def test_an_empty_output_dir_is_refused():
    """'' was the current folder: the run's files mixed with whatever is there, and --overwrite
    deleted its checkpoints/ and final/."""
    with pytest.raises(UserError) as caught:
        load_config(None, [*REQUIRED, "train.output_dir=''"])
    assert str(caught.value) == ("override \"train.output_dir=''\": key 'train.output_dir': an empty name; give "
                                 "the folder the run is written in, e.g. runs/dpo.")


@pytest.mark.parametrize("overrides", [["loss.weights=[0]"], ["loss.type=[sigmoid,sft]", "loss.weights=[0,0.0]"]])
def test_loss_weights_all_zero_are_refused(overrides):
    """Every loss times 0 was accepted: the run spent its steps and trained nothing."""
    with pytest.raises(UserError) as caught:
        load_config(None, [*REQUIRED, *overrides])
    assert str(caught.value) == (f"override {overrides[-1]!r}: key 'loss.weights': every weight is 0, so the run "
                                 "would train nothing; give at least one loss type a weight above 0.")


@pytest.mark.parametrize("override, said", [
    ("loss.type=5", "key 'loss.type': Input should be a valid string or a valid list."),
    ("loss.type=[sigmoid,5]", "key 'loss.type.1': Input should be a valid string."),
    ("data.share_prompt=maybe", "key 'data.share_prompt': Input should be a valid boolean, unable to interpret "
                                "input or 'auto'."),
])
def test_a_value_that_fits_no_member_of_a_union_is_one_error_for_its_key(override, said):
    # pydantic names each member ('loss.type.str', 'loss.type.list[str]'), which are no keys.
    with pytest.raises(UserError) as caught:
        load_config(None, [*REQUIRED, override])
    assert str(caught.value) == f"override {override!r}: {said}"


def test_a_key_written_twice_in_the_yaml_is_refused_with_its_line(tmp_path):
    # yaml.safe_load keeps the second value and drops the first without a word.
    path = tmp_path / "config.yaml"
    path.write_text("model: {path: m}\ndata: {train: t.jsonl}\ntrain:\n  batch_size: 4\n  batch_size: 8\n")
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}, line 5: not valid YAML (key 'batch_size' is written twice; keep one)."


def test_a_run_folder_given_as_the_config_names_its_config_yaml(tmp_path):
    with pytest.raises(UserError) as caught:
        load_config(tmp_path)
    assert str(caught.value) == (f"config file {tmp_path} is a folder; pass a YAML file (a run's is "
                                 f"{tmp_path / 'config.yaml'}).")


def test_eval_split_without_eval_data_is_refused():
    # It picks the split of data.eval; alone it read nothing, and the run evaluated nothing.
    with pytest.raises(UserError) as caught:
        load_config(None, [*REQUIRED, "data.eval_split=test"])
    assert str(caught.value) == ("overrides: data.eval_split is 'test', but data.eval is not set, so no split is "
                                 "read for evaluation; set data.eval to the data set holding that split (the "
                                 "same as data.train for its held-out split), or remove data.eval_split.")


def test_max_prompt_length_without_max_length_is_refused():
    # It is the prompt's floor when a sequence is cut to max_length; alone it did nothing.
    with pytest.raises(UserError) as caught:
        load_config(None, [*REQUIRED, "data.max_length=null", "data.max_prompt_length=128"])
    assert str(caught.value) == ("overrides: data.max_prompt_length is set, but data.max_length is null, so nothing "
                                 "is truncated and it has no effect; set data.max_length, or remove "
                                 "data.max_prompt_length.")


@pytest.mark.parametrize("override", ["=5", "train.=4", ".batch_size=4", "train..batch_size=4"])
def test_an_override_key_with_an_empty_part_is_named(override):
    # "=5" said only "Extra inputs are not permitted." after the file's name.
    with pytest.raises(UserError) as caught:
        load_config(None, [*REQUIRED, override])
    assert str(caught.value) == (f"override {override!r}: the key before '=' is empty or has an empty part; write "
                                 "a dotted key such as optim.lr=1e-6.")


def test_an_unknown_key_with_nothing_close_lists_the_section_keys():
    with pytest.raises(UserError) as caught:
        load_config(None, REQUIRED + ["optim.nesterov=true"])
    message = str(caught.value)
    assert "did you mean" not in message
    assert "unknown key 'optim.nesterov'; the keys of optim are name, lr," in message


@pytest.mark.parametrize("key, where", [
    ("optim.learning_rate=1e-6", "unknown key 'optim.learning_rate' (TRL's name: preftune's is optim.lr)"),
    ("per_device_train_batch_size=4", "unknown key 'per_device_train_batch_size' (TRL's name: "
                                      "preftune's is train.batch_size); the keys of the config are model,"),
    ("train.rpo_alpha=1", "preftune's is loss.type: [sigmoid, sft] with loss.weights: [1, alpha])"),
    ("optim.warmup_ratio=0.1", "preftune's is optim.warmup_steps, which below 1 is a share of the run's steps)"),
    ("train.discopop_tau=0.1", "unknown key 'train.discopop_tau' (TRL's name: preftune's is loss.discopop_tau)"),
    ("loss.use_weighting=true", "unknown key 'loss.use_weighting' (TRL's name: preftune's is loss.wpo_weighting)"),
    ("ld_alpha=0.5", "unknown key 'ld_alpha' (TRL's name: preftune's is loss.ld_alpha)"),
    ("train.dataset_num_proc=4", "unknown key 'train.dataset_num_proc' (a TRL setting: parallel preprocessing, "
                                 "which preftune does not use: it tokenizes in one process; remove it)"),
    # Same name, other meaning: TRL's keep_start (its default) cuts completions, preftune's keep_start
    # the prompt's end (test_trl_parity.py checks the equivalent it names against TRL's collator).
    ("truncation_mode=keep_start", "preftune's is data.truncation, which names the end of the prompt kept, not of "
                                   "the sequence: TRL's keep_start (its default) keeps the prompt whole and cuts "
                                   "completions, which is data.max_prompt_length: max_length - 1 here;"),
    ("loss.loss_type=bco_pair", "unless loss.bco_reward_shift: none (TRL 1.16's bco_pair))"),
    ("label_smoothing=0.1", "the sigmoid loss reads too (conservative DPO), where TRL 1.16's sigmoid ignores it)"),
    ("lr_scheduler_type=linear", "TRL's default is linear, preftune's constant)"),
    ("num_train_epochs=3", "preftune's is train.epochs, whole epochs (TRL's default is 3, preftune's 1))"),
    ("train.logging_steps=10", "unknown key 'train.logging_steps' (a TRL setting: a logging interval, which "
                               "preftune does not need: it logs every optimizer step; remove it)"),
    ("precompute_ref_batch_size=64", "(a TRL setting: the batch size of the reference precompute"),
    ("run_name=beta-0.1", "unknown key 'run_name' (a TRL setting: the run's name, which is train.output_dir's "
                          "folder name (TensorBoard's folder, W&B's run name); set WANDB_NAME to name the W&B run "
                          "otherwise; remove it)"),
    ("ddp_timeout=600", "unknown key 'ddp_timeout' (TRL's name: preftune's is train.ddp_timeout)"),
    ("dataset_test_split=test", "preftune's is data.eval_split)"),
    ("eval_strategy=steps", "preftune's is train.eval_every, in optimizer steps (left out, eval pairs are "
                            "evaluated at the last step only))"),
    ("report_to=none", "preftune's is train.loggers, a list of jsonl, tensorboard and wandb (TRL's none is [jsonl]))"),
    # TRL's flat `optim: adamw_torch` falls on preftune's optim section.
    ("optim=adamw_torch", "key 'optim' is a section of keys here; TRL's optim setting is optim.name (adamw or rmsprop)."),
])
def test_a_trl_key_is_told_its_preftune_name(key, where):
    with pytest.raises(UserError) as caught:
        load_config(None, REQUIRED + [key])
    assert where in str(caught.value)


def test_a_flat_trl_config_is_told_every_key_at_once(tmp_path):
    # Three errors per try, a 15-key TRL config took five tries, and never said which keys to drop.
    path = tmp_path / "trl.yaml"
    path.write_text("model_name_or_path: m\ndataset_name: d.jsonl\nbeta: 0.1\nlearning_rate: 5.0e-7\n"
                    "per_device_train_batch_size: 2\nlogging_steps: 10\noptim: adamw_torch\n")
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert str(caught.value) == (
        f"{path}: 7 keys are TRL's, where preftune keeps its settings in sections (model, data, loss, optim, "
        "train); write each as preftune's key, e.g. loss: {beta: 0.1}:\n"
        "  model_name_or_path: model.path\n  dataset_name: data.train\n  beta: loss.beta\n"
        "  learning_rate: optim.lr\n  per_device_train_batch_size: train.batch_size\n"
        "  logging_steps: remove it (a logging interval, which preftune does not need: it logs every optimizer step)\n"
        "  optim: optim.name (adamw or rmsprop)")


@pytest.mark.parametrize("section, defaults", [("lora", {"r": 16, "alpha": 32.0}),
                                               ("reference_sync", {"every": 512, "alpha": 0.6})])
def test_trls_switches_turn_a_section_on_with_its_defaults_or_off(section, defaults):
    # TRL's use_peft: true / sync_ref_model: true, carried over as model.lora: true, were
    # "Input should be a valid dictionary".
    on = getattr(load_config(None, REQUIRED + [f"model.{section}=true"]).model, section)
    assert {key: getattr(on, key) for key in defaults} == defaults
    assert getattr(load_config(None, REQUIRED + [f"model.{section}=false"]).model, section) is None


def test_trls_max_steps_of_minus_one_is_told_null():
    # TRL's default, copied over with the rest of a config, was "Input should be greater than 0".
    with pytest.raises(UserError) as caught:
        load_config(None, REQUIRED + ["train.max_steps=-1"])
    assert str(caught.value) == ("override 'train.max_steps=-1': key 'train.max_steps': -1 is TRL's 'no limit'; "
                                 "here that is null: remove train.max_steps to train for train.epochs.")


@pytest.mark.parametrize("written, steps_in_200", [("0", 0), ("20", 20), ("20.0", 20), ("0.1", 20),
                                                   ("0.101", 21), ("0.0", 0)])
def test_warmup_is_whole_steps_or_a_share_of_the_run_rounded_up(written, steps_in_200):
    # transformers 5's convention: a value below 1 is a share of the run's optimizer steps.
    optim = load_config(None, REQUIRED + [f"optim.warmup_steps={written}"]).optim
    assert optim.warmup_steps_in(200) == steps_in_200


def test_a_warmup_that_is_neither_whole_steps_nor_a_share_is_refused():
    with pytest.raises(UserError) as caught:
        load_config(None, REQUIRED + ["optim.warmup_steps=2.5"])
    assert "key 'optim.warmup_steps': 2.5 is neither whole steps (e.g. 100) nor a share of the run's steps " \
           "below 1 (e.g. 0.1)" in str(caught.value)


def test_an_unknown_key_inside_an_optional_section():
    with pytest.raises(UserError, match=r"unknown key 'model.lora.rank'; the keys of model.lora are r, alpha"):
        load_config(None, REQUIRED + ["model.lora.r=8", "model.lora.rank=8"])


def test_eval_file_and_eval_fraction_together_are_refused():
    # Silently ignoring one of them would evaluate on other pairs than the user meant.
    with pytest.raises(UserError) as caught:
        load_config(None, REQUIRED + ["data.eval=held_out.jsonl", "data.eval_fraction=0.1"])
    assert str(caught.value) == ("overrides: data.eval and data.eval_fraction are both set; keep data.eval to "
                                 "evaluate on its pairs, or remove it to hold out data.eval_fraction of the "
                                 "training pairs.")


def test_holding_out_by_prompt_without_a_fraction_to_hold_out_is_refused():
    # data.eval_fraction_by only says how data.eval_fraction draws; alone it would do nothing.
    with pytest.raises(UserError) as caught:
        load_config(None, REQUIRED + ["data.eval_fraction_by=prompt"])
    assert str(caught.value) == ("overrides: data.eval_fraction_by: prompt holds out a share of the prompts, "
                                 "but data.eval_fraction is 0; set data.eval_fraction (e.g. 0.05), or remove "
                                 "data.eval_fraction_by.")
    with pytest.raises(UserError) as caught:
        load_config(None, REQUIRED + ["data.eval=held_out.jsonl", "data.eval_fraction_by=prompt"])
    assert str(caught.value) == ("overrides: data.eval_fraction_by: prompt holds out prompts of data.train, but "
                                 "data.eval gives the eval pairs; remove data.eval_fraction_by, or remove "
                                 "data.eval and set data.eval_fraction.")
    config = load_config(None, REQUIRED + ["data.eval_fraction=0.1", "data.eval_fraction_by=prompt"])
    assert config.data.eval_fraction_by == "prompt"
    assert load_config(None, REQUIRED).data.eval_fraction_by == "pair"  # the row split stays the default


def test_an_error_is_printed_as_text_not_as_markup(tmp_path):
    # rich would drop `[lora]` from an install hint, and raise on an unmatched `[/b]`.
    from typer.testing import CliRunner

    from preftune.cli import app

    missing = tmp_path / "runs[/b]" / "config[lora].yaml"
    result = CliRunner().invoke(app, ["train", str(missing)])
    assert result.exit_code == 2, result.output
    assert f"config file {missing} does not exist." in result.output


def test_eval_on_the_training_data_and_split_is_refused_and_eval_split_picks_another():
    same = REQUIRED + ["data.eval=pairs.jsonl"]
    with pytest.raises(UserError, match=r"data.eval names the same data as data.train, and the same split "
                                        r"\('train'\), so evaluation would run on training pairs"):
        load_config(None, same)
    assert load_config(None, same + ["data.eval_split=test"]).data.eval_split == "test"
    assert load_config(None, REQUIRED + ["data.eval=other.jsonl"]).data.eval_split is None
    # One of several eval sources: with data.split carried over to it, it read the training split.
    with pytest.raises(UserError, match=r"data.eval names 'pairs.jsonl', which data.train names too, with the "
                                        r"same split \('train'\), so evaluation would run on its training pairs"):
        load_config(None, REQUIRED + ["data.eval=[pairs.jsonl,other.jsonl]"])


def test_compile_mode_without_compile_is_refused():
    # Read only by torch.compile: without model.compile the run would stay eager, unannounced.
    with pytest.raises(UserError) as caught:
        load_config(None, REQUIRED + ["model.compile_mode=reduce-overhead"])
    assert str(caught.value) == ("overrides: model.compile_mode is 'reduce-overhead', but model.compile is false, "
                                 "so nothing is compiled; set model.compile: true, or remove model.compile_mode.")
    assert load_config(None, REQUIRED + ["model.compile=true", "model.compile_mode=reduce-overhead"]).model.compile


@pytest.mark.parametrize("distributed", ["auto", "ddp", "none"])
def test_fsdp_cpu_offload_without_fsdp_is_refused(distributed):
    # Read only when FSDP2 wraps the model: under ddp or one process nothing would be offloaded.
    with pytest.raises(UserError) as caught:
        load_config(None, REQUIRED + ["train.fsdp_cpu_offload=true", f"train.distributed={distributed}"])
    assert str(caught.value) == (f"overrides: train.fsdp_cpu_offload offloads FSDP2's shards, but train.distributed "
                                 f"is {distributed!r}; set train.distributed: fsdp, or remove "
                                 "train.fsdp_cpu_offload.")
    config = load_config(None, REQUIRED + ["train.fsdp_cpu_offload=true", "train.distributed=fsdp"])
    assert config.train.fsdp_cpu_offload


def test_lora_with_a_live_reference_under_fsdp_is_refused_before_anything_loads():
    # The sentence came from shard_reference, after the model and the data had loaded.
    lora_fsdp = REQUIRED + ["model.lora={r: 4}", "train.distributed=fsdp"]
    with pytest.raises(UserError) as caught:
        load_config(None, lora_fsdp)
    assert str(caught.value) == ("overrides: with train.distributed: fsdp, LoRA's reference (the policy with "
                                 "its adapters off) cannot run beside the sharded policy; set model.reference: "
                                 "precompute, or use train.distributed: ddp.")
    for fits in (["model.reference=precompute"], ["model.reference_path=other/model"],
                 ["loss.reference_free=true"], ["train.distributed=ddp"]):
        load_config(None, lora_fsdp + fits)


def test_adamw_settings_with_rmsprop_are_refused():
    # RMSprop takes neither betas nor a fused kernel; the run would go on without them.
    with pytest.raises(UserError) as caught:
        load_config(None, REQUIRED + ["optim.name=rmsprop", "optim.fused=true"])
    assert str(caught.value) == ("overrides: optim.fused is AdamW's, and optim.name is rmsprop, which "
                                 "does not use it; remove optim.fused, or set optim.name: adamw.")
    with pytest.raises(UserError, match="optim.betas and optim.fused are AdamW's"):
        load_config(None, REQUIRED + ["optim.name=rmsprop", "optim.fused=false", "optim.betas=[0.8, 0.9]"])
    assert load_config(None, REQUIRED + ["optim.name=rmsprop"]).optim.name == "rmsprop"


def test_one_logger_name_is_a_list_of_one():
    """TRL users write `report_to=wandb`; `train.loggers=wandb` was refused as 'not a valid list'."""
    assert load_config(None, REQUIRED + ["train.loggers=tensorboard"]).train.loggers == ["tensorboard"]
    assert load_config(None, REQUIRED + ["train.loggers=[jsonl, wandb]"]).train.loggers == ["jsonl", "wandb"]
    with pytest.raises(UserError, match="train.loggers"):
        load_config(None, REQUIRED + ["train.loggers=mlflow"])


def _schema_defaults(model, prefix=""):
    """{dotted key: default as config.yaml writes it, or 'required'} for every key of `model`."""
    from pydantic import BaseModel

    keys = {}
    for name, field in model.model_fields.items():
        key = prefix + name
        default = field.default
        keys[key] = "required" if field.is_required() else list(default) if isinstance(default, tuple) else default
        members = [field.annotation, *getattr(field.annotation, "__args__", ())]
        sections = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if sections:
            keys.update(_schema_defaults(sections[0], key + "."))
    return keys


def test_docs_config_lists_every_key_with_its_default():
    # A key missing from the page is one a user never learns exists; a stale default misleads.
    import re
    from pathlib import Path

    import yaml

    from preftune.config import Config

    page = (Path(__file__).parents[1] / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    documented, section = {}, None
    for line in page.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif match := re.match(r"\| `([\w.]+)` \| (required|`[^`]*`) \|", line):
            cell = match.group(2)
            documented[f"{section}.{match.group(1)}"] = cell if cell == "required" else yaml.safe_load(cell[1:-1])
    # The five sections are headings, not rows: keep the keys inside them.
    expected = {key: value for key, value in _schema_defaults(Config).items() if "." in key}
    assert documented == expected
