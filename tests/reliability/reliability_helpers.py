"""Helpers for the reliability tests: small runs, subprocess launches, weight comparison."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from preftune.config import ModelConfig, validate_config

REPO = Path(__file__).resolve().parents[2]
KILL_AT = Path(__file__).resolve().with_name("kill_at.py")

# Twenty-four distinct pairs (six steps of four per epoch), each with a pair_id.
PAIRS = [
    {"pair_id": f"p{i:02d}", "prompt": f"Question {i}: name a colour.\nAnswer:",
     "chosen": f" Blue, shade {i}.", "rejected": f" Seven dogs {i * 7}."}
    for i in range(24)
]


def write_pairs(path: Path, rows=PAIRS) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def run_config(model: Path, data: Path, output_dir: Path, **sections) -> dict:
    """A deterministic CPU run of twelve optimizer steps that saves after every step."""
    raw = {
        "model": {"path": str(model)},
        "data": {"train": str(data), "max_length": 64, "eval_fraction": 0.0},
        "loss": {"type": "sigmoid", "beta": 0.1},
        "optim": {"lr": 1e-3, "scheduler": "cosine", "warmup_steps": 2},
        "train": {"batch_size": 4, "grad_accum": 1, "epochs": 2, "save_every": 1,
                  "output_dir": str(output_dir), "seed": 0, "deterministic": True,
                  "report": False, "progress": False},
    }
    if "disable_dropout" in ModelConfig.model_fields:
        # Keep the model's dropout on, so resuming must restore the RNG to be bit-identical.
        raw["model"]["disable_dropout"] = False
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def train_in_process(raw: dict, resume=None) -> Path:
    from preftune.train import train

    return train(validate_config(raw), resume=resume)


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def child_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    return env


def start_training(config_path: Path, *args: str, log: Path, kill_at: tuple[str, int] | None = None
                   ) -> subprocess.Popen:
    """`python -m preftune train CONFIG ARGS` in its own process, stdout+stderr into `log`.
    `kill_at=(POINT, STEP)` runs it under kill_at.py, which SIGKILLs it at that point."""
    out = open(log, "ab")  # noqa: SIM115 - closed by finish()
    launcher = [str(KILL_AT), kill_at[0], str(kill_at[1])] if kill_at else ["-m", "preftune"]
    proc = subprocess.Popen([sys.executable, *launcher, "train", str(config_path), *args],
                            stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)
    proc.log_file = out
    return proc


def resume_to_the_end(config_path: Path, log: Path) -> None:
    proc = start_training(config_path, "--resume", log=log)
    code = finish(proc)
    assert code == 0, log.read_text()[-3000:]


def metrics_without_speed(output_dir: Path) -> list[dict]:
    """metrics.jsonl's records less tokens_per_second, the one number a rerun does not repeat."""
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_second"} for line in lines]


def finish(proc: subprocess.Popen, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:  # never leave a child behind, whatever failed
            proc.kill()
            proc.wait()
        proc.log_file.close()


def wait_until(condition, proc: subprocess.Popen, timeout: float = 240, interval: float = 0.002) -> bool:
    """Poll `condition()` until true; False when the process ended or time ran out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(interval)
    return False


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differing, f"tensors differ: {differing[:5]}"
