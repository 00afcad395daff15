"""The GPU benchmark script must work the first time it meets a GPU: device time is scarce. Its
CPU dry run (GPU_BENCH_SMOKE=1: a tiny shape, the same code paths and JSON) runs here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_script_dry_run_writes_both_trainers_results(tmp_path):
    env = {**os.environ, "GPU_BENCH_SMOKE": "1", "GPU_BENCH_CONFIGS": "preftune-lean,trl",
           "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    results = report["results"]
    assert set(results) == {"preftune-lean", "trl"}
    assert all(r["tokens_per_second"] > 0 for r in results.values())
    assert results["preftune-lean"]["speedup_vs_trl"] > 0
    assert (tmp_path / "gpu_bench.log").read_text().count("round 1:") == 2


@pytest.mark.slow
def test_bench_profiles_the_measured_steps_of_both_trainers(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_dpo.py"), "--preset", "smoke",
                           "--configs", "preftune,trl", "--profile", str(tmp_path)],
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for config in ("preftune", "trl"):
        summary = json.loads((tmp_path / f"profile-{config}.json").read_text())
        assert summary["steps"] == 2 and summary["wall_seconds_per_step"] > 0, summary
        assert summary["kernels_per_step"] == 0  # no CUDA here; on a GPU, the kernels launched
        table = (tmp_path / f"profile-{config}.txt").read_text()
        assert "aten::mm" in table and "Optimizer.step" in table  # the measured steps, optimizer included
