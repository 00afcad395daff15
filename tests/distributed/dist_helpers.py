"""Helpers for the distributed tests: configs with one global batch, torchrun launches on CPU,
and comparisons of metrics.jsonl and final weights between runs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "examples" / "tiny_prefs.jsonl"
GLOBAL_BATCH = 8  # pairs per optimizer step, whatever the number of processes
STEP_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected", "grad_norm", "learning_rate")


def write_config(folder: Path, model: Path, nproc: int, **train) -> Path:
    """A short deterministic run; batch_size x grad_accum x nproc is always GLOBAL_BATCH."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = {
        "model": {"path": str(model)},
        "data": {"train": str(DATA), "eval_fraction": 0.1, "max_length": 96},
        "loss": {"type": "sigmoid", "beta": 0.1},
        "optim": {"lr": 1.0e-3, "scheduler": "cosine", "warmup_steps": 1},
        "train": {"batch_size": GLOBAL_BATCH // (2 * nproc), "grad_accum": 2, "max_steps": 4,
                  "eval_every": 2, "output_dir": str(folder / "run"), "report": False,
                  "progress": False, "seed": 0, **train},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def worker_env() -> dict:
    # One thread per process: two workers share this machine's cores.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def run_command(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run in its own process group, so a timeout kills the workers too, not only the launcher."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{out}\n{err}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def preftune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "preftune", "train", *map(str, args)]


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(nproc), "-m", "preftune", "train", *map(str, args)]


def train_in_process(config_path: Path, *overrides: str, resume: str | bool | None = None) -> Path:
    """One process, in this one, single-threaded like the workers; returns the run folder."""
    import torch.distributed as torch_dist

    from preftune.config import load_config
    from preftune.train import train

    config = load_config(config_path, list(overrides))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config, resume=resume)
    finally:
        torch.set_num_threads(threads)
        if torch_dist.is_initialized():  # a failed fsdp run must not leave its group behind
            torch_dist.destroy_process_group()
    return Path(config.train.output_dir)


def metrics(run: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(training rows, eval rows) of metrics.jsonl by step; the last line of a step wins."""
    train_rows, eval_rows = {}, {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        (eval_rows if any(k.startswith("eval/") for k in row) else train_rows)[row["step"]] = row
    return train_rows, eval_rows


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = final_weights(a), final_weights(b)
    assert sorted(wa) == sorted(wb), "the two runs saved different tensors"
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def assert_same_rows(expected: dict[int, dict], got: dict[int, dict], keys, tol: float) -> None:
    assert sorted(got) == sorted(expected)
    for step, row in expected.items():
        for key in keys:
            a, b = row[key], got[step][key]
            # log-probs are sums of about sixty tokens: their tolerance is relative.
            assert math.isclose(a, b, rel_tol=tol, abs_tol=tol), f"step {step} {key}: {a} vs {b}"


def assert_runs_match(single: Path, other: Path, tol: float, steps=None) -> None:
    """Same per-step metrics, same evaluation, same final weights, within `tol`."""
    train_a, eval_a = metrics(single)
    train_b, eval_b = metrics(other)
    if steps is not None:
        train_a = {s: r for s, r in train_a.items() if s in steps}
        eval_a = {s: r for s, r in eval_a.items() if s in steps}
    assert_same_rows(train_a, train_b, STEP_KEYS, tol)
    assert_same_rows(eval_a, eval_b, ["eval/" + k for k in STEP_KEYS[:7]], tol)
    assert all(row["tokens_per_second"] > 0 for row in train_b.values())
    difference = max_weight_difference(single / "final", other / "final")
    assert difference <= tol, f"final weights differ by {difference}"
