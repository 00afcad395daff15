"""The run folder (train.output_dir): a fresh run never mixes with an earlier one there."""

from pathlib import Path

import pytest
import yaml
from preftune_test_data import make_config, read_metrics
from typer.testing import CliRunner

from preftune.checkpoint import list_checkpoints
from preftune.cli import app
from preftune.errors import UserError
from preftune.train import _check_output_dir, _start_over, train


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


def test_overwrite_starts_over_keeping_only_the_reference_cache(tmp_path, run_config):
    run = tmp_path / "run"
    assert cli("train", run_config).exit_code == 0
    (run / "notes.txt").write_text("mine")
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
    # --resume now continues the new run (its last step, 2), not the deleted step-000004.
    result = cli("train", run / "config.yaml", "--resume", "train.max_steps=3")
    assert result.exit_code == 0, result.output
    assert f"resumedfrom{run / 'checkpoints' / 'step-000002'}atstep2" in squash(result.output)
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]


def test_resume_and_overwrite_together_are_refused(tmp_path, run_config):
    result = cli("train", run_config, "--resume", "--overwrite")
    assert result.exit_code == 2
    assert "passoneofthem,notboth" in squash(result.output)


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


# ------------------------------------------------------------------------------ report wording


def test_report_on_a_missing_folder_names_the_train_setting(tmp_path):
    result = cli("report", tmp_path / "nowhere")
    assert result.exit_code == 2
    assert "train.output_dir" in result.output and "--out folder" not in result.output
