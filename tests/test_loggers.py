"""MetricsLogger: metrics.jsonl always, TensorBoard and W&B when chosen, silence off rank 0."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from preftune_test_data import online_wandb_without_credentials

from preftune.errors import UserError
from preftune.loggers import MetricsLogger
from preftune.records import read_records


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_line_per_step_flushed_before_close(tmp_path):
    logger = MetricsLogger(tmp_path / "run")
    logger.log({"loss": torch.tensor(0.69), "rewards/accuracies": np.float64(0.5)}, step=1)
    # Readable while the run is still going (a crash must not lose logged steps).
    assert read_lines(tmp_path / "run" / "metrics.jsonl") == [
        {"step": 1, "loss": pytest.approx(0.69), "rewards/accuracies": 0.5}
    ]
    logger.log({"eval/loss": 0.6}, step=2)
    logger.close()
    logger.close()  # twice is harmless
    lines = read_lines(tmp_path / "run" / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2]
    assert lines[1] == {"step": 2, "eval/loss": 0.6}


def test_non_finite_values_become_null_so_the_file_stays_valid_json(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log({"loss": float("nan"), "grad_norm": float("inf"), "note": "warmup"}, step=3)
    assert read_records(tmp_path / "metrics.jsonl") == [
        {"step": 3, "loss": None, "grad_norm": None, "note": "warmup"}
    ]
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()


def test_a_resumed_run_appends(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log({"loss": 0.7}, step=1)
    with MetricsLogger(tmp_path) as logger:
        logger.log({"loss": 0.6}, step=2)
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl")] == [1, 2]


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "rank1", backends=["jsonl", "tensorboard"], enabled=False)
    logger.log({"loss": 0.7}, step=1)
    logger.close()
    assert not (tmp_path / "rank1").exists()


def test_unknown_backend_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown logger backend 'mlflow'"):
        MetricsLogger(tmp_path, backends=["jsonl", "mlflow"])


def test_tensorboard_events_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, ["tensorboard"], run_name="r1", config_dict={"beta": 0.1}) as lg:
        for step in range(1, 4):
            lg.log({"loss": 1.0 / step, "rewards/chosen": 0.1 * step}, step=step)
    events = EventAccumulator(str(tmp_path / "tensorboard" / "r1"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert events.Scalars("train/rewards/chosen")[2].value == pytest.approx(0.3)
    assert (tmp_path / "metrics.jsonl").exists()


def test_a_resumed_run_shows_each_step_once_in_tensorboard(tmp_path):
    # Stopped after step 5 with its last checkpoint at step 4: the resumed run logs 5 again.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, ["tensorboard"], run_name="r") as lg:
        for step in range(1, 6):
            lg.log({"loss": 1.0}, step=step)
    with MetricsLogger(tmp_path, ["tensorboard"], run_name="r", start_step=4) as lg:
        for step in range(5, 8):
            lg.log({"loss": 2.0}, step=step)
    events = EventAccumulator(str(tmp_path / "tensorboard" / "r"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == \
        [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 2.0), (6, 2.0), (7, 2.0)]


@pytest.mark.parametrize("blocker", ["tensorboard", "tensorboard/r"])
def test_a_file_where_the_tensorboard_folder_goes_is_one_sentence(tmp_path, blocker):
    """A run resumed with tensorboard added to train.loggers, whose OUT/tensorboard is a file,
    ended in a NotADirectoryError traceback from inside tensorboard."""
    (tmp_path / blocker).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / blocker).touch()
    with pytest.raises(UserError) as caught:
        MetricsLogger(tmp_path, ["jsonl", "tensorboard"], run_name="r", start_step=2)
    assert str(caught.value) == (f"train.loggers tensorboard writes to {tmp_path / 'tensorboard' / 'r'}, but "
                                 f"{tmp_path / blocker} is not a folder; move it away, or drop tensorboard from "
                                 "train.loggers.")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_backend_that_cannot_start_leaves_no_metrics_file(tmp_path, monkeypatch):
    # Otherwise the folder looks like a run, and the retry is refused as if one were there.
    pytest.importorskip("wandb")
    import wandb

    def not_logged_in(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", not_logged_in)
    with pytest.raises(UserError, match=r"wandb: No API key configured.*WANDB_MODE=offline"):
        MetricsLogger(tmp_path / "run", ["jsonl", "tensorboard", "wandb"])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / "tensorboard").exists()


@pytest.mark.parametrize(
    "backend, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")]
)
def test_missing_backend_package_is_a_user_error(tmp_path, monkeypatch, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(UserError, match=f"'{backend}' is chosen but .* not installed"):
        MetricsLogger(tmp_path, backends=[backend])


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with MetricsLogger(tmp_path, ["wandb"], run_name="offline", config_dict={"beta": 0.1}) as lg:
        lg.log({"loss": 0.69}, step=1)
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline run folder written"


def test_wandb_takes_its_name_group_tags_and_project_from_the_hf_variables(tmp_path, monkeypatch):
    # HF users name a W&B run with WANDB_NAME; the run folder's name passed as name= beat it.
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # wandb reads WANDB_RUN_GROUP and WANDB_TAGS once per process, at its setup
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for variable, value in {"WANDB_NAME": "beta-0.1", "WANDB_RUN_GROUP": "sweep",
                            "WANDB_TAGS": "dpo,tiny", "WANDB_PROJECT": "prefs"}.items():
        monkeypatch.setenv(variable, value)
    with MetricsLogger(tmp_path, ["wandb"], run_name="run-folder", config_dict={"loss": {"beta": 0.1}}) as lg:
        run = lg._wandb_run
        assert (run.name, run.group, tuple(run.tags), run.project) == ("beta-0.1", "sweep", ("dpo", "tiny"), "prefs")
        assert run.config["loss"] == {"beta": 0.1}
    monkeypatch.delenv("WANDB_NAME")
    with MetricsLogger(tmp_path / "other", ["wandb"], run_name="run-folder") as lg:
        assert lg._wandb_run.name == "run-folder"
    wandb.teardown()  # later tests' runs must not inherit this group and these tags


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for start_step in (0, 2, 0):  # a run, its resume, then a fresh start in the folder
        with MetricsLogger(tmp_path, ["wandb"], run_name="r", start_step=start_step) as lg:
            ids.append(lg._wandb_run.id)
            lg.log({"loss": 0.6}, step=start_step + 1)
    assert ids[1] == ids[0] and ids[2] != ids[0]


def test_a_resume_sends_wandb_only_the_steps_its_run_does_not_hold(tmp_path, monkeypatch):
    # Killed after step 7, resumed from the checkpoint at step 4: the online W&B run resumes at
    # its step 8 (wandb's starting_step) and drops steps 5-7 again with a warning each time.
    import preftune.loggers as loggers

    class ResumedRun:
        id, name, dir = "abc", "r", str(tmp_path / "wandb" / "run-abc" / "files")
        starting_step = 8
        rows = []

        def log(self, numbers, step):
            self.rows.append(step)

        def finish(self):
            pass

    run = ResumedRun()
    monkeypatch.setattr(loggers, "_open_wandb", lambda *args, **kwargs: run)
    with MetricsLogger(tmp_path, ["jsonl", "wandb"], run_name="r", start_step=4) as lg:
        for step in range(5, 10):
            lg.log({"loss": 1.0}, step=step)
        lg.log({"eval/loss": 0.5}, step=9)
    assert run.rows == [8, 9, 9]
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl")] == [5, 6, 7, 8, 9, 9]


def test_a_viewer_that_fails_mid_run_is_turned_off_and_training_goes_on(tmp_path, monkeypatch, capsys):
    # W&B's service process killed at step 2: its run.log raises ConnectionResetError from then
    # on. A dashboard dying must not end hours of training; metrics.jsonl keeps every step.
    import preftune.loggers as loggers

    class DeadAfterFirstStep:
        id, name, dir = "abc", "run", str(tmp_path / "wandb" / "run-abc" / "files")
        logged, finished = [], False

        def log(self, numbers, step):
            if step > 1:
                raise ConnectionResetError("Connection lost")
            self.logged.append(step)

        def finish(self):
            raise ConnectionResetError("Connection lost")

    run = DeadAfterFirstStep()
    monkeypatch.setattr(loggers, "_open_wandb", lambda *args, **kwargs: run)
    with MetricsLogger(tmp_path, ["jsonl", "wandb"]) as lg:
        for step in range(1, 5):
            lg.log({"loss": 1.0 / step}, step=step)
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert run.logged == [1]
    err = capsys.readouterr().err
    assert err.count("failed") == 1  # once, not per step, and not again at close
    assert ("logger backend 'wandb' failed at step 2 (ConnectionResetError: Connection lost) and is "
            f"turned off for the rest of the run; {tmp_path / 'metrics.jsonl'} keeps every step.") in err


def test_tensorboard_and_wandb_name_metrics_as_the_hf_trainer_does_for_trl(tmp_path, monkeypatch):
    # TRL's DPOTrainer logs through the HF Trainer's callbacks, which write `train/<key>` and
    # `eval/<key>` (transformers.integrations.rewrite_logs) against `train/global_step`: the
    # same names here let preftune's and TRL's runs share a panel. metrics.jsonl keeps TRL's
    # log-history names.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.integrations.integration_utils import rewrite_logs

    import preftune.loggers as loggers

    class Run:
        id, name, dir = "abc", "run", str(tmp_path / "wandb" / "run-abc" / "files")
        rows = []

        def log(self, numbers, step):
            self.rows.append((step, numbers))

        def finish(self):
            pass

    run = Run()
    monkeypatch.setattr(loggers, "_open_wandb", lambda *args, **kwargs: run)
    train_line = {"loss": 0.6, "rewards/chosen": 0.1, "learning_rate": 1e-6, "epoch": 0.5}
    with MetricsLogger(tmp_path, ["jsonl", "tensorboard", "wandb"], run_name="r") as lg:
        lg.log(train_line, step=3)
        lg.log({"eval/loss": 0.5}, step=3)
    hf = rewrite_logs(train_line) | rewrite_logs({"eval_loss": 0.5})
    events = EventAccumulator(str(tmp_path / "tensorboard" / "r"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(hf)
    assert [(e.step, e.value) for e in events.Scalars("train/rewards/chosen")] == [(3, pytest.approx(0.1))]
    assert run.rows == [(3, {**rewrite_logs(train_line), "train/global_step": 3}),
                        (3, {"eval/loss": 0.5, "train/global_step": 3})]
    assert read_lines(tmp_path / "metrics.jsonl")[0] == {"step": 3, **train_line}


def test_the_summary_names_the_wandb_folder_only_when_wandb_writes_one(tmp_path, monkeypatch):
    # WANDB_MODE=disabled gives a no-op run whose `dir` is a made-up path that never exists.
    # (Set in-process, wandb keeps the first mode it saw, so the no-op run is imitated here.)
    pytest.importorskip("wandb")
    import types

    import preftune.loggers as loggers

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with MetricsLogger(tmp_path / "offline", ["jsonl", "wandb"], run_name="r") as lg:
        lines = lg.where()
    assert lines[0] == f"metrics: {tmp_path / 'offline' / 'metrics.jsonl'}"
    (line,) = [line for line in lines if line.startswith("wandb: ")]
    folder = Path(line.removeprefix("wandb: ").split(" (W&B run")[0])
    assert folder.is_dir() and folder.parent == tmp_path / "offline" / "wandb"

    noop = types.SimpleNamespace(disabled=True, id="x", name="r", dir="/tmp/wandb/run-x/files",
                                 log=lambda *a, **k: None, finish=lambda: None)
    monkeypatch.setattr(loggers, "_open_wandb", lambda *args, **kwargs: noop)
    with MetricsLogger(tmp_path / "disabled", ["jsonl", "wandb"], run_name="r") as lg:
        assert lg.where() == [f"metrics: {tmp_path / 'disabled' / 'metrics.jsonl'}"]


@pytest.mark.parametrize("variable, value, expected", [
    ("WANDB_MODE", "ofline", "set it to online, offline or disabled"),
    ("WANDB_PROJECT", "team/dpo", r"set it to the project's name alone \(the team goes in WANDB_ENTITY\)"),
])
def test_a_wandb_variable_wandb_refuses_is_named_before_the_model_loads(tmp_path, monkeypatch, variable,
                                                                          value, expected):
    # wandb.init answers a mistyped WANDB_MODE with a pydantic traceback, and an 'entity/project'
    # WANDB_PROJECT with a message naming no variable; train checks the backends before loading.
    pytest.importorskip("wandb")
    from preftune.loggers import check_backends

    monkeypatch.setenv("WANDB_MODE", "offline")  # never online, even where the check were missing
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv(variable, value)
    sentence = f"the environment variable {variable}='{value}' is refused by wandb; {expected}, or unset it."
    with pytest.raises(UserError, match=sentence):
        check_backends(["jsonl", "wandb"])
    with pytest.raises(UserError, match=sentence):
        MetricsLogger(tmp_path / "run", ["jsonl", "wandb"])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_online_wandb_without_an_api_key_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    # wandb.init refused it only once the model and data were loaded, after --overwrite had
    # deleted the earlier run. Where wandb would find a key, or would not go online, it passes.
    pytest.importorskip("wandb")
    from preftune.loggers import check_backends

    online_wandb_without_credentials(monkeypatch, tmp_path)
    with pytest.raises(UserError) as caught:
        check_backends(["jsonl", "wandb"])
    assert str(caught.value) == (
        "train.loggers has wandb, and W&B is online (WANDB_MODE, else its default) but no API key is "
        "configured and there is no terminal to ask for one; run `wandb login` or set WANDB_API_KEY, set "
        "WANDB_MODE=offline to log locally and `wandb sync` later, or drop wandb from train.loggers.")
    check_backends(["jsonl", "tensorboard"])  # only wandb needs a key
    check_backends(["wandb"], logs=False)  # and only on the rank that logs
    from wandb.errors import term

    monkeypatch.setattr(term, "can_use_terminput", lambda: True)
    check_backends(["wandb"])  # at a terminal wandb asks for the key...
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.raises(UserError):  # ...unless told to be silent
        check_backends(["wandb"])
    monkeypatch.delenv("WANDB_SILENT")
    monkeypatch.setattr(term, "can_use_terminput", lambda: False)
    key = "k" * 40
    (tmp_path / "no-netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {key}\n")
    check_backends(["wandb"])  # what `wandb login` writes
    (tmp_path / "no-netrc").unlink()
    monkeypatch.delenv("WANDB_MODE")  # online by default: refused, unless a settings file says otherwise
    with pytest.raises(UserError):
        check_backends(["wandb"])
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "settings").write_text("[default]\nmode = offline\n")  # what `wandb offline` writes
    check_backends(["wandb"])
    (tmp_path / "wandb" / "settings").unlink()
    monkeypatch.setenv("WANDB_API_KEY", key)
    check_backends(["wandb"])
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    check_backends(["wandb"])


def test_a_run_resumed_at_its_last_step_shows_its_eval_there_once_in_tensorboard(tmp_path):
    # Killed while writing final/, after the last step's eval: the resumed run evaluates at that
    # step again. metrics.jsonl drops the first eval line; TensorBoard must too, and keep the
    # step's training line, which the resumed run does not log again.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, ["tensorboard"], run_name="r") as lg:
        for step in range(1, 6):
            lg.log({"loss": float(step)}, step=step)
        lg.log({"eval/loss": 0.5}, step=5)
    with MetricsLogger(tmp_path, ["tensorboard"], run_name="r", start_step=5, redo_eval_at_start=True) as lg:
        lg.log({"eval/loss": 0.25}, step=5)
    assert read_records(tmp_path / "metrics.jsonl")[-2:] == [{"step": 5, "loss": 5.0}, {"step": 5, "eval/loss": 0.25}]
    events = EventAccumulator(str(tmp_path / "tensorboard" / "r"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == [(5, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(s, float(s)) for s in range(1, 6)]


def test_a_resume_shows_its_config_in_tensorboard_at_the_step_it_starts_from(tmp_path):
    # A resume may extend the run (max_steps) or change eval_every; TensorBoard kept only the
    # first launch's config, so it showed settings the run no longer had (W&B's config updates).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, ["tensorboard"], run_name="r", config_dict={"max_steps": 6}) as lg:
        for step in range(1, 7):
            lg.log({"loss": 1.0}, step=step)
    with MetricsLogger(tmp_path, ["tensorboard"], run_name="r", config_dict={"max_steps": 9}, start_step=4) as lg:
        for step in range(5, 10):
            lg.log({"loss": 2.0}, step=step)
    events = EventAccumulator(str(tmp_path / "tensorboard" / "r"))
    events.Reload()
    shown = [(e.step, json.loads(e.tensor_proto.string_val[0].decode().strip("`\n")))
             for e in events.Tensors("config/text_summary")]
    assert shown == [(0, {"max_steps": 6}), (4, {"max_steps": 9})]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(s, 1.0 if s <= 4 else 2.0) for s in range(1, 10)]


def test_tensorboard_hparams_tab_lists_each_run_with_its_settings(tmp_path):
    # The config was only text: runs could not be filtered or sorted by loss.beta in
    # TensorBoard's HParams tab. Each run now writes its settings there, and no experiment
    # summary of its own, so the tab gathers every run in the folder (and their scalars).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    config = {"loss": {"beta": 0.1, "type": ["sigmoid"], "label_smoothing": None},
              "train": {"token_metrics": False}}
    with MetricsLogger(tmp_path, ["tensorboard"], run_name="r", config_dict=config) as lg:
        lg.log({"loss": 0.6}, step=1)
    events = EventAccumulator(str(tmp_path / "tensorboard" / "r"))
    events.Reload()
    assert metadata.EXPERIMENT_TAG not in events.Tags()["tensors"]
    content = events.SummaryMetadata(metadata.SESSION_START_INFO_TAG).plugin_data.content
    settings = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
            for key, value in settings.items()} == \
        {"loss.beta": 0.1, "loss.type": '["sigmoid"]', "train.token_metrics": "false"}
