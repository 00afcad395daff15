"""The run folder (train.output_dir): a fresh run never mixes with an earlier one there, and the
config.yaml a run saves works from any directory."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from preftune_test_data import make_config, online_wandb_without_credentials, read_metrics
from typer.testing import CliRunner

from preftune.checkpoint import list_checkpoints
from preftune.cli import app
from preftune.config import with_absolute_paths
from preftune.errors import UserError
from preftune.train import LOCK_FILE, _check_output_dir, _start_over, train


def squash(text: str) -> str:
    return "".join(text.split())  # rich wraps long lines anywhere


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def run_config(tmp_path, tiny_llama, pairs_file, one_torch_thread):
    """A 4-step run with checkpoints at 2 and 4, a precomputed reference and a report."""
    raw = {
        "model": {"path": str(tiny_llama), "reference": "precompute"},
        "data": {"train": str(pairs_file), "max_length": 64},
        "optim": {"lr": 1e-3},
        "train": {"batch_size": 4, "max_steps": 4, "save_every": 2, "seed": 0, "progress": False,
                  "output_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------------------ a run already there


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(tmp_path, run_config):
    run = tmp_path / "run"
    assert cli("train", run_config).exit_code == 0
    before = (run / "metrics.jsonl").read_text()
    result = cli("train", run_config, "train.max_steps=2", "optim.lr=1e-5")
    assert result.exit_code == 2
    message = squash(result.output)
    for part in (f"train.output_dir{run}alreadyholdsarun", "--resume", "anothertrain.output_dir",
                 "--overwrite"):
        assert part in message, result.output
    assert "Traceback" not in result.output
    # Nothing of the earlier run was touched.
    assert (run / "metrics.jsonl").read_text() == before
    assert [c.name for c in list_checkpoints(run)] == ["step-000002", "step-000004"]


def test_resuming_past_the_runs_end_is_refused_and_touches_nothing(tmp_path, run_config):
    # A shorter max_steps at --resume trained nothing, yet rewrote final/ and a config.yaml whose
    # max_steps no longer said how long the run was.
    run = tmp_path / "run"
    assert cli("train", run_config).exit_code == 0
    config_before = (run / "config.yaml").read_text()
    result = cli("train", run / "config.yaml", "--resume", "train.max_steps=2")
    assert result.exit_code == 2
    assert squash(result.output).endswith(squash(
        f"error: checkpoint {run}/checkpoints/step-000004 is at step 4, past this run's 2 steps (train.max_steps, "
        "train.epochs); raise them to extend the run, or pass --resume-from an earlier checkpoint."))
    assert (run / "config.yaml").read_text() == config_before
    result = cli("train", run / "config.yaml", "--resume-from", run / "checkpoints" / "step-000002",
                 "train.max_steps=2")  # at its end: allowed, as after a kill while writing final/
    assert result.exit_code == 0, result.output


def test_overwrite_starts_over_keeping_only_the_reference_cache(tmp_path, run_config):
    run = tmp_path / "run"
    assert cli("train", run_config).exit_code == 0
    (run / "notes.txt").write_text("mine")
    (run / "merged-step-000002").mkdir()  # `preftune export` of one of its checkpoints
    cache = sorted((run / "reference_logps").glob("*.safetensors"))
    result = cli("train", run_config, "--overwrite", "train.max_steps=2", "train.save_every=1",
                 "optim.lr=1e-5")
    assert result.exit_code == 0, result.output
    assert "deletedtheearlierrun's" in squash(result.output)
    assert "kept:notes.txt,reference_logps" in squash(result.output)  # nothing goes unsaid
    assert "log-probsfromthecache" in squash(result.output)  # still valid, so reused
    assert sorted((run / "reference_logps").glob("*.safetensors")) == cache
    assert [m["step"] for m in read_metrics(run)] == [1, 2]  # the new run's steps only
    assert [c.name for c in list_checkpoints(run)] == ["step-000001", "step-000002"]
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 1e-5
    assert "report.html" in {p.name for p in run.iterdir()}
    assert not (run / "merged-step-000002").exists()
    # --resume now continues the new run (its last step, 2), not the deleted step-000004.
    result = cli("train", run / "config.yaml", "--resume", "train.max_steps=3")
    assert result.exit_code == 0, result.output
    assert f"resumedfrom{run / 'checkpoints' / 'step-000002'}atstep2" in squash(result.output)
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]


def test_overwrite_keeps_the_earlier_run_when_wandb_cannot_start(tmp_path, run_config, monkeypatch):
    # --overwrite deleted the earlier run once the model and data were ready, and then wandb.init
    # refused to go online without an API key: the old run was gone and no new one was made.
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    assert cli("train", run_config).exit_code == 0
    before = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")}
    online_wandb_without_credentials(monkeypatch, tmp_path)
    result = cli("train", run_config, "--overwrite", "train.loggers=[jsonl,wandb]")
    assert result.exit_code == 2
    assert {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert "deleted" not in result.output
    assert "no API key is configured" in result.output


def test_overwrite_refuses_to_delete_the_model_or_data_it_trains_from(tmp_path, run_config):
    # A second round trained from the first's final policy (or its `preftune export`) into the same
    # folder: --overwrite deleted final/ after loading it, and the round's starting model was lost.
    run = tmp_path / "run"
    assert cli("train", run_config).exit_code == 0
    before = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")}
    result = cli("train", run_config, "--overwrite", f"model.path={run / 'final'}")
    assert result.exit_code == 2
    assert {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert squash(result.output).endswith(squash(
        f"error: --overwrite would delete {run / 'final'}, and model.path {run / 'final'} is in it; copy it out "
        f"of {run} first, or choose another train.output_dir."))


def test_resume_from_another_runs_checkpoint_leaves_a_run_in_output_dir_alone(tmp_path, run_config):
    # It continued run A's checkpoint in run B's folder: B's metrics after the step were dropped,
    # the two runs' lines and checkpoints mixed, and B's final policy was replaced.
    run_a, run_b = tmp_path / "run", tmp_path / "b"
    assert cli("train", run_config).exit_code == 0
    assert cli("train", run_config, f"train.output_dir={run_b}").exit_code == 0
    before = {p.relative_to(run_b): p.stat().st_mtime_ns for p in run_b.rglob("*")}
    checkpoint = run_a / "checkpoints" / "step-000002"
    result = cli("train", run_config, f"train.output_dir={run_b}", "--resume-from", checkpoint)
    assert result.exit_code == 2
    assert {p.relative_to(run_b): p.stat().st_mtime_ns for p in run_b.rglob("*")} == before
    assert squash(result.output).endswith(squash(
        f"error: --resume-from {checkpoint} is a checkpoint of {run_a}, and train.output_dir {run_b} holds "
        f"another run (metrics.jsonl, checkpoints, final, report.html, plots); continue it in {run_a} or "
        "in an empty train.output_dir."))
    # The run's own folder or checkpoints/ given for a checkpoint of it: said what it is.
    result = cli("train", run_config, "--resume-from", run_a / "checkpoints")
    assert result.exit_code == 2
    assert squash(result.output).endswith(squash(
        f"error: --resume-from {run_a / 'checkpoints'} is a run's checkpoints folder, not a checkpoint; name "
        f"one of its checkpoints, e.g. --resume-from {run_a / 'checkpoints' / 'step-000004'}."))
    # Into a folder of its own, a checkpoint starts a branch of its run.
    result = cli("train", run_config, f"train.output_dir={tmp_path / 'branch'}", "--resume-from", checkpoint)
    assert result.exit_code == 0, result.output
    assert [m["step"] for m in read_metrics(tmp_path / "branch")] == [3, 4]


def test_resume_with_nothing_to_resume_is_said_before_the_model_loads(tmp_path, run_config):
    # Said only once the model, the data and the reference's log-probs were ready: minutes on a
    # large model, for a typo in train.output_dir. A model that is not there shows which comes first.
    result = cli("train", run_config, "--resume", f"model.path={tmp_path / 'no-model'}")
    assert result.exit_code == 2
    assert squash(result.output).endswith(squash(
        f"error: --resume: {tmp_path / 'run'} holds no run to resume; check train.output_dir, or leave "
        "--resume out to start a run there."))


def test_a_resume_with_a_changed_loss_or_optimizer_setting_is_refused_before_the_model_loads(
        tmp_path, run_config, monkeypatch):
    # Refused only once the model (and the reference's log-probs) had loaded: minutes on a large
    # model, for a one-line refusal.
    import preftune.train as train_module

    run = tmp_path / "run"
    assert cli("train", run_config).exit_code == 0

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the changed setting was noticed")

    monkeypatch.setattr(train_module, "load_tokenizer", load)
    monkeypatch.setattr(train_module, "load_causal_lm", load)
    result = cli("train", run / "config.yaml", "--resume", "train.max_steps=6", "loss.beta=0.2", "optim.lr=1e-4")
    assert result.exit_code == 2, result.output
    assert squash(result.output).endswith(squash(
        f"error: checkpoint {run / 'checkpoints' / 'step-000004'} was written with loss.beta 0.1 (now 0.2), "
        "optim.lr 0.001 (now 0.0001); a resumed run must keep the settings that fix its data order, loss, "
        "optimizer and schedule, so set them back (the run's config.yaml holds them), or start a new run in "
        "another train.output_dir."))
    checkpoint = run / "checkpoints" / "step-000002"
    result = cli("train", run / "config.yaml", "--resume-from", checkpoint, "loss.type=ipo")
    assert result.exit_code == 2, result.output
    assert squash(result.output).endswith(squash(
        f"error: checkpoint {checkpoint} was written with loss.type 'sigmoid' (now 'ipo'); a resumed run must "
        "keep the settings that fix its data order, loss, optimizer and schedule, so set it back (the run's "
        "config.yaml holds them), or start a new run in another train.output_dir."))


def test_a_run_folder_this_user_cannot_write_is_one_sentence(tmp_path, run_config, monkeypatch):
    # Opening the lock file is the first write of a run: a folder of another account's gave a
    # PermissionError traceback. (A monkeypatched open: root may write anywhere.)
    import preftune.train

    assert cli("train", run_config).exit_code == 0

    def open_denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(preftune.train, "open", open_denied, raising=False)
    result = cli("train", run_config, "--resume", "train.max_steps=6")
    assert result.exit_code == 2
    assert squash(result.output).endswith(squash(
        f"error: train.output_dir {tmp_path / 'run'} cannot be written by this user; make it writable "
        "(chmod u+w) or choose another train.output_dir."))


def test_a_run_folder_another_train_is_using_is_refused(tmp_path, run_config):
    # Nothing kept a second `preftune train` out of a folder a run was training in: --overwrite
    # deleted the running run's files, --resume wrote checkpoints and metrics among its own.
    import subprocess
    import sys

    run = tmp_path / "run"
    assert cli("train", run_config).exit_code == 0
    hold = ("import fcntl, sys; h = open(sys.argv[1], 'a+'); fcntl.flock(h, fcntl.LOCK_EX | fcntl.LOCK_NB); h.truncate(0); "
            "h.write('4242'); h.flush(); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run / LOCK_FILE)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")}
        for args in (["--overwrite"], ["--resume", "train.max_steps=6"]):
            result = cli("train", run_config, *args)
            assert result.exit_code == 2
            assert squash(result.output).endswith(squash(
                f"error: train.output_dir {run} is in use by another preftune train (process 4242); wait for "
                "it to end, or choose another train.output_dir."))
        assert {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")} == before
    finally:
        holder.stdin.close()
        holder.wait()
    assert cli("train", run_config, "--resume", "train.max_steps=6").exit_code == 0  # free once it ends
    # A run of this process that stopped with an error frees it too, for a run in another process.
    assert cli("train", run_config, "--resume", "train.max_steps=2").exit_code == 2  # past its steps
    import fcntl

    with open(run / LOCK_FILE, "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_lora_without_peft_is_said_before_the_model_loads(tmp_path, tiny_llama, pairs_file, monkeypatch):
    # Said once the model had loaded: minutes on a large one, for a package that was missing.
    import sys

    import preftune.train as train_module

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails

    def load_causal_lm(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing peft was noticed")

    monkeypatch.setattr(train_module, "load_causal_lm", load_causal_lm)
    with pytest.raises(UserError) as caught:
        train(make_config(tmp_path, tiny_llama, pairs_file, model={"lora": {"r": 4}}))
    assert str(caught.value) == "model.lora needs the peft package: pip install 'preftune[lora]'."


def test_resume_with_another_model_under_model_path_is_refused(tmp_path, run_config, tiny_llama,
                                                               tiny_model_factory):
    # The policy's weights come from the checkpoint, but the reference is built from model.path
    # again: another model there (a seed of the same architecture) changed the loss mid-run unseen.
    run = tmp_path / "run"
    assert cli("train", run_config).exit_code == 0
    other = tiny_model_factory("llama", seed=1)
    result = cli("train", run / "config.yaml", "--resume", "train.max_steps=6", f"model.path={other}")
    assert result.exit_code == 2
    assert squash(result.output).endswith(squash(
        f"error: checkpoint {run / 'checkpoints' / 'step-000004'} was written for another starting model: the "
        f"weight files under model.path {other} differ from those the run started from, and the reference built "
        "from them would change mid-run; point it back to the model the run started with, or start a new run in "
        "another train.output_dir."))
    moved = shutil.copytree(tiny_llama, tmp_path / "moved")  # the same model elsewhere: paths may change
    result = cli("train", run / "config.yaml", "--resume", "train.max_steps=6", f"model.path={moved}")
    assert result.exit_code == 0, result.output


def test_resume_and_overwrite_together_are_refused(tmp_path, run_config):
    result = cli("train", run_config, "--resume", "--overwrite")
    assert result.exit_code == 2
    assert "passoneofthem,notboth" in squash(result.output)


def test_an_output_dir_that_is_a_file_or_cannot_be_made_is_one_sentence(tmp_path, tiny_llama, pairs_file,
                                                                        one_torch_thread):
    # Both ended in a FileExistsError / NotADirectoryError traceback, the first after the model loaded.
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(UserError) as caught:
        train(make_config(tmp_path, tiny_llama, pairs_file, train={"output_dir": str(a_file)}))
    assert str(caught.value) == f"train.output_dir {a_file} is a file, not a folder; choose another train.output_dir."
    with pytest.raises(UserError) as caught:
        train(make_config(tmp_path, tiny_llama, pairs_file, train={"output_dir": str(a_file / "run")}))
    assert str(caught.value) == (f"train.output_dir {a_file / 'run'}: the folder cannot be made (Not a directory); "
                                 "choose another train.output_dir.")


def test_a_folder_with_only_a_config_or_a_reference_cache_is_no_run(tmp_path, tiny_llama, pairs_file,
                                                                   one_torch_thread):
    """The demo copies a reference cache into a run folder before training; a user may keep
    the config there: neither is a run that a new one would mix with."""
    cfg = make_config(tmp_path, tiny_llama, pairs_file, train={"max_steps": 1})
    run = Path(cfg.train.output_dir)
    (run / "reference_logps").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {path: x}\n")
    assert train(cfg) == run / "final"


def test_the_python_api_refuses_too_and_takes_overwrite(tmp_path, tiny_llama, pairs_file, one_torch_thread):
    import preftune

    cfg = make_config(tmp_path, tiny_llama, pairs_file, train={"max_steps": 1})
    preftune.train(cfg)
    with pytest.raises(UserError, match="already holds a run"):
        preftune.train(cfg)
    assert preftune.train(cfg, overwrite=True) == tmp_path / "run" / "final"
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1]


class FakeDist:
    """One rank of a distributed run: `rank0_saw` is what all_reduce_sum brings back from rank 0."""

    def __init__(self, is_main: bool, rank0_saw: bool):
        self.is_main, self.rank0_saw, self.barriers = is_main, rank0_saw, 0

    def all_reduce_sum(self, value: float) -> float:
        return value + (0.0 if self.is_main else float(self.rank0_saw))

    def barrier(self) -> None:
        self.barriers += 1


def test_every_rank_follows_rank_0_and_only_rank_0_deletes(tmp_path):
    empty, held = tmp_path / "empty", tmp_path / "held"
    (held / "checkpoints" / "step-000002").mkdir(parents=True)
    (held / "metrics.jsonl").write_text("{}\n")
    # A rank that sees no run (its own disk) still refuses when rank 0 saw one, and the other way.
    with pytest.raises(UserError, match="already holds a run"):
        _check_output_dir(empty, None, False, FakeDist(is_main=False, rank0_saw=True))
    assert not _check_output_dir(held, None, False, FakeDist(is_main=False, rank0_saw=False))
    assert _check_output_dir(held, None, True, FakeDist(is_main=False, rank0_saw=True))
    other = FakeDist(is_main=False, rank0_saw=True)
    _start_over(held, console=None, dist=other)
    assert (held / "metrics.jsonl").exists() and other.barriers == 1  # waited, deleted nothing


def test_a_config_yaml_that_cannot_be_written_whole_leaves_the_old_one(tmp_path):
    # The command that resumes a run reads its config.yaml, rewritten at every launch; a full disk
    # (here a file size limit) cut it to nothing, and the run's settings were lost.
    import subprocess
    import sys

    from preftune.config import dump_config, validate_config

    path = tmp_path / "config.yaml"
    dump_config(validate_config({"model": {"path": "m"}, "data": {"train": "d.jsonl"}}), path)
    before = path.read_text()
    script = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100)); "
              "from preftune.config import dump_config, load_config; import sys; "
              "dump_config(load_config(sys.argv[1], ['optim.lr=1e-5']), sys.argv[1])")
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True)
    assert "File too large" in result.stderr
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left


# ------------------------------------------------------------------------------ paths in config.yaml


def test_saved_config_holds_absolute_local_paths_and_leaves_hub_ids(tmp_path, monkeypatch):
    from preftune.config import validate_config

    monkeypatch.chdir(tmp_path)
    Path("model").mkdir()
    Path("a.jsonl").write_text("")
    Path("e.jsonl").write_text("")
    cfg = validate_config({"model": {"path": "model", "reference_path": "org/hub-model"},
                           "data": {"train": ["a.jsonl", "org/hub-data"], "eval": "e.jsonl"},
                           "train": {"output_dir": "runs/x"}})
    saved = with_absolute_paths(cfg)
    assert saved.model.path == str(tmp_path / "model")
    assert saved.model.reference_path == "org/hub-model"
    assert saved.data.train == [str(tmp_path / "a.jsonl"), "org/hub-data"]
    assert saved.data.eval == str(tmp_path / "e.jsonl")
    assert saved.train.output_dir == str(tmp_path / "runs" / "x")
    assert cfg.model.path == "model"  # the run itself keeps what the user typed


def test_a_run_trained_with_relative_paths_is_used_from_another_directory(tmp_path, tiny_llama, pairs_file,
                                                                          monkeypatch, one_torch_thread):
    pytest.importorskip("peft")
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    shutil.copytree(tiny_llama, here / "tiny")
    shutil.copy(pairs_file, here / "train.jsonl")
    shutil.copy(pairs_file, here / "eval.jsonl")
    (here / "c.yaml").write_text(
        "model: {path: tiny}\n"
        "data: {train: train.jsonl, eval: eval.jsonl, max_length: 64}\n"
        "train: {batch_size: 4, max_steps: 2, save_every: 1, output_dir: runs/full, progress: false,"
        " report: false}\n")
    monkeypatch.chdir(here)
    assert cli("train", "c.yaml").exit_code == 0
    lora = ["train.output_dir=runs/lora", "model.lora.r=4", "model.lora.target_modules=[q_proj,v_proj]"]
    assert cli("train", "c.yaml", *lora).exit_code == 0

    monkeypatch.chdir(elsewhere)  # HF_HUB_OFFLINE=1 (conftest): a relative 'tiny' would fail
    full, lora_run = here / "runs" / "full", here / "runs" / "lora"
    # The reference comes from RUN/config.yaml's model.path.
    result = cli("eval", "pairs", "--model", full / "final", "--data", here / "eval.jsonl",
                 "--out", elsewhere / "ev")
    assert result.exit_code == 0, result.output
    result = cli("train", full / "config.yaml", "--resume", "train.max_steps=3")
    assert result.exit_code == 0, result.output
    assert [m["step"] for m in read_metrics(full)] == [1, 2, 3]
    assert not (elsewhere / "runs").exists()  # resumed in the run's folder, not a new one here
    result = cli("export", lora_run, "--merge")  # the base is the run's model.path
    assert result.exit_code == 0, result.output
    assert (lora_run / "merged" / "config.json").exists()
    # PEFT users load the adapter on its own: its base must not depend on the directory either.
    from peft import AutoPeftModelForCausalLM

    adapter_config = json.loads((lora_run / "final" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(here / "tiny")
    AutoPeftModelForCausalLM.from_pretrained(lora_run / "final")


# ------------------------------------------------------------------------------ report wording


def test_report_on_a_missing_folder_names_the_train_setting(tmp_path):
    result = cli("report", tmp_path / "nowhere")
    assert result.exit_code == 2
    assert "train.output_dir" in result.output and "--out folder" not in result.output
