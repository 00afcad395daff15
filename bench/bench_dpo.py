"""preftune vs TRL's DPOTrainer: the same model shape, data, batch, precision and optimizer.

    .venv/bin/python bench/bench_dpo.py                       # the CPU shape of BENCHMARKS.md
    .venv/bin/python bench/bench_dpo.py --preset gpu-0.5b     # the Qwen2.5-0.5B shape, on CUDA

Both trainers start from the same randomly initialised Qwen2-shaped model saved to a temporary
folder, with a character-level tokenizer (one token per character), so synthetic pairs of
exactly P prompt + R response tokens (EOS included) mean the same ids to both. Each measured
configuration runs in its own subprocess (so peak RSS / CUDA memory belongs to it alone), and
the configurations alternate round by round, so a noisy neighbour slows all of them alike.

Per run: `warmup` optimizer steps, then `steps` measured ones. The time of the measured steps
is end of step `warmup` to end of the last step, as wall clock, for both trainers. preftune's
reference pre-pass (model.reference: precompute) runs before training over every pair of the
run; its steady cost per pair (its first batch, the process's first CUDA kernels, left out as
the warm-up steps are) is charged for every pair the measured steps train on, and its whole
time is reported beside (`prepass_seconds`).
Tokens are prompt + response tokens of the chosen and the rejected sequence of every pair.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {
    # About 6M parameters: the CPU target of issue 6.
    "cpu-6m": {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 1024,
               "vocab": 8192, "tied": True, "prompt_len": 64, "response_len": 128, "batch": 4,
               "warmup": 2, "steps": 6, "rounds": 3, "autocast": "none"},
    # Qwen2.5-0.5B's shape (494M parameters), bf16 autocast: the GPU target.
    "gpu-0.5b": {"hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2, "intermediate": 4864,
                 "vocab": 151936, "tied": True, "prompt_len": 256, "response_len": 512, "batch": 4,
                 "warmup": 3, "steps": 10, "rounds": 1, "autocast": "bfloat16"},
    # The 0.5B shape's structure (24 layers, 14 + 2 heads) at tiny widths: a step's time is then
    # the host's share of the work (Python, dispatch, launches), what a fast GPU leaves exposed.
    "host-0.5b": {"hidden": 112, "layers": 24, "heads": 14, "kv_heads": 2, "intermediate": 192,
                  "vocab": 1024, "tied": True, "prompt_len": 16, "response_len": 32, "batch": 4,
                  "warmup": 3, "steps": 10, "rounds": 3, "autocast": "bfloat16"},
    # A seconds-long shape to check the script itself (tests, CPU dry runs of gpu.sh).
    "smoke": {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 64, "vocab": 512,
              "tied": True, "prompt_len": 8, "response_len": 16, "batch": 2, "warmup": 1, "steps": 2,
              "rounds": 1, "autocast": "none"},
}

# The adapters of the LoRA configurations: PEFT's common choice of every linear layer but the head.
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}

# name -> (trainer, options). "preftune" runs with its defaults: no flags beyond the shared ones.
CONFIGS = {
    "preftune": ("preftune", {"overrides": []}),
    "preftune-precompute": ("preftune", {"overrides": ["model.reference=precompute"]}),
    # The memory-lean setting: no second model, activations recomputed.
    "preftune-lean": ("preftune", {"overrides": ["model.reference=precompute",
                                                 "model.gradient_checkpointing=true"]}),
    "preftune-compile": ("preftune", {"overrides": ["model.reference=precompute", "model.compile=true"]}),
    "preftune-lean-compile": ("preftune", {"overrides": ["model.reference=precompute", "model.compile=true",
                                                         "model.gradient_checkpointing=true"]}),
    # CUDA graphs over the compiled step (fixed-length pairs give one batch shape).
    "preftune-lean-graphs": ("preftune", {"overrides": ["model.reference=precompute", "model.compile=true",
                                                        "model.gradient_checkpointing=true",
                                                        "model.compile_mode=reduce-overhead"]}),
    "trl": ("trl", {"gradient_checkpointing": True}),  # TRL's default
    "trl-no-ckpt": ("trl", {"gradient_checkpointing": False}),
    # LoRA on both sides: the same adapters, and the reference is the base model with them off.
    "preftune-lora": ("preftune", {"overrides": [f"model.lora.{k}={v}" for k, v in LORA.items()]}),
    "trl-lora": ("trl", {"gradient_checkpointing": True, "lora": True}),  # TRL's default checkpointing
    "trl-lora-no-ckpt": ("trl", {"gradient_checkpointing": False, "lora": True}),
}
LR, BETA, SEED = 1.0e-6, 0.1, 0


# ------------------------------------------------------------------------------ the shared setup


def char_tokenizer():
    """A byte-level BPE tokenizer with no merges: every ASCII letter is exactly one token."""
    from preftune.demo.tiny import train_tokenizer

    # 256 byte symbols + 6 specials leave no room for a merge.
    return train_tokenizer(["abc"], vocab_size=262)


def write_model(folder: Path, shape: dict) -> None:
    from preftune.demo.tiny import build_model, special_token_ids
    from preftune.modeling import quiet_transformers

    quiet_transformers()
    tokenizer = char_tokenizer()
    model = build_model("qwen2", vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                        num_layers=shape["layers"], num_heads=shape["heads"],
                        num_kv_heads=shape["kv_heads"], intermediate_size=shape["intermediate"],
                        max_positions=max(512, shape["prompt_len"] + shape["response_len"]),
                        tie_embeddings=shape["tied"], seed=SEED,
                        special_ids=special_token_ids(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_pairs(path: Path, shape: dict, num_pairs: int) -> None:
    """Random lowercase letters: P prompt tokens, R - 1 response tokens (+ EOS = R)."""
    import random

    rng = random.Random(SEED)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def text(n):
        return "".join(rng.choice(letters) for _ in range(n))

    with open(path, "w") as f:
        for _ in range(num_pairs):
            row = {"prompt": text(shape["prompt_len"]), "chosen": text(shape["response_len"] - 1),
                   "rejected": text(shape["response_len"] - 1)}
            f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------ the workers


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def cpu_seconds() -> float:
    """CPU time of this process: under a contended CPU it drifts far less than the wall clock."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def clock() -> tuple[float, float]:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # a step has ended when its kernels have, not when they were queued
    return time.perf_counter(), cpu_seconds()


def window(step_ends: list[tuple[float, float]], first: int, last: int) -> tuple[float, float]:
    """(wall, cpu) seconds from the end of step `first` to the end of step `last` (0-based)."""
    return (step_ends[last][0] - step_ends[first][0], step_ends[last][1] - step_ends[first][1])


class MeasuredStepsProfiler:
    """torch.profiler over the measured steps only (`--profile DIR`): where a step's time goes.

    Started at the end of the last warm-up step, stopped at the end of the last measured one.
    It writes profile-CONFIG.txt (the operators and kernels with the most device time, then
    host time) and profile-CONFIG.json: kernels launched per step, the device's busy time
    per step (the sum of kernel times: one stream, so they do not overlap) and the wall time
    per step. Busy time well under wall time means the step waits on the host (launches,
    Python), not on the GPU. Profiling slows the host, so its run's speed is not a result.
    """

    def __init__(self, folder: str | None, config: str, warmup: int, total: int):
        self.folder, self.config, self.warmup, self.total = folder, config, warmup, total
        self.profiler, self.started = None, 0.0

    def step_ended(self, steps_ended: int) -> None:
        if self.folder is None:
            return
        if steps_ended == self.warmup:
            import torch
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            self.profiler.start()
            self.started = time.perf_counter()
        elif steps_ended == self.total and self.profiler is not None:
            self.profiler.stop()
            try:
                self.write(time.perf_counter() - self.started)
            except Exception as error:  # a profiler quirk must not cost the run its result
                Path(self.folder, f"profile-{self.config}.json").write_text(json.dumps({"error": repr(error)}))

    def write(self, wall: float) -> None:
        from torch.autograd import DeviceType

        steps = self.total - self.warmup
        kernels = [e for e in self.profiler.events() if e.device_type == DeviceType.CUDA]
        busy = sum(e.device_time_total for e in kernels) / 1e6  # microseconds -> seconds
        summary = {"config": self.config, "steps": steps, "wall_seconds_per_step": wall / steps,
                   "kernels_per_step": len(kernels) / steps, "device_busy_seconds_per_step": busy / steps,
                   "device_busy_fraction": busy / wall if wall else 0.0}
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"profile-{self.config}.json").write_text(json.dumps(summary, indent=1))
        averages = self.profiler.key_averages()
        tables = [averages.table(sort_by=key, row_limit=40)
                  for key in (["self_device_time_total"] if kernels else []) + ["self_cpu_time_total"]]
        (folder / f"profile-{self.config}.txt").write_text(json.dumps(summary, indent=1) + "\n\n"
                                                            + "\n\n".join(tables))


def run_preftune(workdir: Path, shape: dict, device: str, overrides: list[str],
                 profiler: MeasuredStepsProfiler) -> dict:
    import preftune.loggers
    import preftune.reference
    from preftune.config import load_config
    from preftune.train import train

    step_ends: list[tuple[float, float]] = []
    losses: list[float] = []
    original_log = preftune.loggers.MetricsLogger.log

    def timed_log(self, metrics, step=None):
        step_ends.append(clock())
        profiler.step_ended(len(step_ends))
        losses.append(metrics.get("loss"))
        return original_log(self, metrics, step=step)

    prepass = {"seconds": 0.0, "cpu_seconds": 0.0, "batch_ends": [], "batch_pairs": []}
    original_precompute = getattr(preftune.reference, "precompute_reference_logps", None)
    if original_precompute is not None:
        def timed_precompute(reference_fn, pairs, batch_size, collate, device):
            def timed_reference(batch):
                result = reference_fn(batch)
                prepass["batch_ends"].append(clock())  # waits for the batch's kernels on CUDA
                prepass["batch_pairs"].append(batch.num_pairs)
                return result

            started = clock()
            result = original_precompute(timed_reference, pairs, batch_size, collate, device)
            ended = clock()
            prepass["seconds"] += ended[0] - started[0]
            prepass["cpu_seconds"] += ended[1] - started[1]
            return result

        preftune.reference.precompute_reference_logps = timed_precompute
    preftune.loggers.MetricsLogger.log = timed_log
    total = shape["warmup"] + shape["steps"]
    config = load_config(None, [
        f"model.path={workdir / 'model'}", f"model.autocast={shape['autocast']}",
        f"data.train={workdir / 'pairs.jsonl'}", "data.max_length=null",
        f"loss.beta={BETA}", f"optim.lr={LR}", "optim.scheduler=constant",
        f"train.batch_size={shape['batch']}", f"train.max_steps={total}", f"train.seed={SEED}",
        f"train.output_dir={workdir / 'out-preftune'}", f"train.device={device}",
        "train.progress=false", "train.report=false", *overrides,
    ])
    shutil.rmtree(workdir / "out-preftune", ignore_errors=True)  # no reference cache from an earlier run
    train(config)
    wall, cpu = window(step_ends, shape["warmup"] - 1, total - 1)
    charged = prepass_charge(prepass, shape["steps"] * shape["batch"], shape["steps"] / total)
    return {"seconds": wall + charged[0], "cpu_seconds": cpu + charged[1],
            "prepass_seconds": prepass["seconds"], "prepass_charged_seconds": charged[0],
            "losses": losses[:total]}


def prepass_charge(prepass: dict, measured_pairs: int, share: float) -> tuple[float, float]:
    """(wall, cpu) seconds of the reference pre-pass charged to the measured steps.

    Like the warm-up steps excluded from both trainers' times, the pre-pass's first batch (the
    process's first CUDA kernels, cuBLAS set-up) is left out: the later batches give its
    steady cost per pair, charged for every pair the measured steps train on. With a single
    batch there is nothing steady to measure, and the whole pass is charged by share of pairs.
    """
    ends, sizes = prepass["batch_ends"], prepass["batch_pairs"]
    if len(ends) < 2:
        return prepass["seconds"] * share, prepass["cpu_seconds"] * share
    pairs = sum(sizes[1:])
    return ((ends[-1][0] - ends[0][0]) / pairs * measured_pairs,
            (ends[-1][1] - ends[0][1]) / pairs * measured_pairs)


def trl_peft_config():
    """`LORA` as the PEFT config TRL takes (preftune takes the same as model.lora overrides)."""
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")


def run_trl(workdir: Path, shape: dict, device: str, profiler: MeasuredStepsProfiler,
            gradient_checkpointing: bool, lora: bool = False) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    step_ends: list[tuple[float, float]] = []
    losses: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(clock())
            profiler.step_ended(len(step_ends))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    rows = [json.loads(line) for line in (workdir / "pairs.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype="float32")
    total = shape["warmup"] + shape["steps"]
    args = DPOConfig(
        output_dir=str(workdir / "out-trl"), per_device_train_batch_size=shape["batch"],
        gradient_accumulation_steps=1, max_steps=total, learning_rate=LR, beta=BETA,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
        seed=SEED, max_length=None, gradient_checkpointing=gradient_checkpointing,
        bf16=shape["autocast"] == "bfloat16", use_cpu=device == "cpu", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[StepClock()],
                         peft_config=trl_peft_config() if lora else None)
    trainer.train()
    wall, cpu = window(step_ends, shape["warmup"] - 1, total - 1)
    return {"seconds": wall, "cpu_seconds": cpu, "prepass_seconds": 0.0, "losses": losses[:total]}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    shape = json.loads(args.shape)
    workdir = Path(args.workdir)
    trainer, options = CONFIGS[args.worker]
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = peak_memory_bytes("cpu")
    profiler = MeasuredStepsProfiler(args.profile, args.worker, shape["warmup"], shape["warmup"] + shape["steps"])
    if trainer == "preftune":
        result = run_preftune(workdir, shape, args.device, options["overrides"] + args.preftune_overrides,
                              profiler)
    else:
        result = run_trl(workdir, shape, args.device, profiler, **options)
    tokens = shape["steps"] * shape["batch"] * 2 * (shape["prompt_len"] + shape["response_len"])
    result.update(config=args.worker, tokens=tokens, tokens_per_second=tokens / result["seconds"],
                  tokens_per_cpu_second=tokens / result["cpu_seconds"],
                  step_seconds=result["seconds"] / shape["steps"],
                  peak_memory_bytes=peak_memory_bytes(args.device),
                  rss_at_start_bytes=rss_before)
    Path(args.result).write_text(json.dumps(result))


# ------------------------------------------------------------------------------ the orchestrator


def count_parameters(workdir: Path) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def launch(name: str, workdir: Path, shape: dict, args) -> dict:
    result_path = workdir / f"result-{name}.json"
    command = [sys.executable, __file__, "--worker", name, "--workdir", str(workdir),
               "--shape", json.dumps(shape), "--device", args.device, "--threads", str(args.threads),
               "--result", str(result_path)]
    for override in args.preftune_overrides:
        command += ["--preftune-override", override]
    if args.profile:
        command += ["--profile", str(Path(args.profile).resolve())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-8000:])
        if not args.keep_going:
            raise SystemExit(f"{name} failed (exit {completed.returncode})")
        return {"config": name, "error": f"exit {completed.returncode}: {completed.stderr[-2000:]}"}
    result = json.loads(result_path.read_text())
    # What the run said on the way (a "skipping cudagraphs" hint, a recompile) stays with it.
    result["stderr_tail"] = completed.stderr[-3000:]
    return result


def summarise(runs: dict[str, list[dict]], shape: dict, params: int, args) -> dict:
    summary = {}
    for name, results in runs.items():
        results = [r for r in results if "error" not in r]
        if not results:
            summary[name] = {"error": runs[name][0]["error"]}
            continue
        tps = [r["tokens_per_second"] for r in results]
        summary[name] = {
            "tokens_per_second": statistics.median(tps), "tokens_per_second_all": tps,
            "tokens_per_cpu_second": statistics.median(r["tokens_per_cpu_second"] for r in results),
            "step_seconds": statistics.median(r["step_seconds"] for r in results),
            "peak_memory_gib": max(r["peak_memory_bytes"] for r in results) / 2**30,
            "prepass_seconds": statistics.median(r["prepass_seconds"] for r in results),
            "prepass_charged_seconds": statistics.median(r.get("prepass_charged_seconds", 0.0) for r in results),
            "first_losses": results[0]["losses"][:3],
        }
        if args.device == "cuda":
            # 6 N FLOPs per token for the policy's forward + backward, 2 N for the reference.
            flops = 8 * params * summary[name]["tokens_per_second"]
            summary[name]["mfu"] = flops / (args.peak_tflops * 1e12)
    for base_name, base in summary.items():
        if not base_name.startswith("preftune"):
            continue
        for name, s in summary.items():
            if not name.startswith("preftune") and "error" not in s and "error" not in base:
                base[f"speedup_vs_{name}"] = base["tokens_per_second"] / s["tokens_per_second"]
                base[f"cpu_time_speedup_vs_{name}"] = base["tokens_per_cpu_second"] / s["tokens_per_cpu_second"]
                base[f"memory_ratio_vs_{name}"] = base["peak_memory_gib"] / s["peak_memory_gib"]
    return summary


def print_table(summary: dict, device: str) -> None:
    memory = "peak CUDA GiB" if device == "cuda" else "peak RSS GiB"
    print(f"{'config':<21}{'tokens/s':>10}{'tok/cpu-s':>11}{'step s':>10}{memory:>15}{'prepass s':>11}"
          f"{'charged s':>11}")
    for name, s in summary.items():
        if "error" in s:
            print(f"{name:<21}failed: {s['error'].splitlines()[-1] if s['error'].strip() else s['error']}")
            continue
        print(f"{name:<21}{s['tokens_per_second']:>10.0f}{s['tokens_per_cpu_second']:>11.0f}{s['step_seconds']:>10.3f}"
              f"{s['peak_memory_gib']:>15.3f}{s['prepass_seconds']:>11.2f}{s['prepass_charged_seconds']:>11.2f}"
              + (f"   MFU {s['mfu']:.1%}" if "mfu" in s else ""))
    for name, s in summary.items():
        for key, value in s.items():
            if key.startswith(("speedup", "cpu_time_speedup", "memory_ratio")):
                print(f"{name} {key.replace('_', ' ')}: {value:.2f}x")


def orchestrate(args) -> dict:
    shape = {**PRESETS[args.preset]}
    for key in ("warmup", "steps", "rounds", "batch"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    if args.autocast:
        shape["autocast"] = args.autocast
    names = args.configs.split(",")
    with tempfile.TemporaryDirectory(prefix="preftune-bench-") as tmp:
        workdir = Path(tmp)
        write_model(workdir / "model", shape)
        write_pairs(workdir / "pairs.jsonl", shape, (shape["warmup"] + shape["steps"]) * shape["batch"])
        params = count_parameters(workdir)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for round_index in range(shape["rounds"]):
            order = names if round_index % 2 == 0 else list(reversed(names))
            for name in order:
                result = launch(name, workdir, shape, args)
                runs[name].append(result)
                if args.json:  # what has run so far survives a timeout of the whole script
                    write_json(args.json, {"partial": True, "shape": shape, "runs": runs})
                if "error" in result:
                    print(f"round {round_index + 1}: {name}: failed", flush=True)
                    continue
                print(f"round {round_index + 1}: {name}: {result['tokens_per_second']:.0f} tokens/s, "
                      f"{result['step_seconds']:.3f} s/step", flush=True)
    summary = summarise(runs, shape, params, args)
    print_table(summary, args.device)
    return {"preset": args.preset, "shape": shape, "parameters": params, "device": args.device,
            "device_name": device_name(args.device), "threads": args.threads,
            "preftune_overrides": args.preftune_overrides, "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": platform.processor() or platform.machine(), "results": summary, "runs": runs}


def write_json(path: str, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-6m", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--configs", default="preftune,trl,trl-no-ckpt",
                        help=f"comma-separated, from: {', '.join(CONFIGS)}")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (1: steadiest on a shared CPU)")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--autocast", choices=["none", "bfloat16"])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak, for MFU")
    parser.add_argument("--preftune-override", dest="preftune_overrides", action="append", default=[],
                        help="extra key=value for preftune (e.g. model.reference=copy)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--keep-going", action="store_true", help="record a failed run and go on")
    parser.add_argument("--profile", metavar="DIR",
                        help="profile each run's measured steps into DIR (its speed is then not a result)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    report = orchestrate(args)
    if args.json:
        write_json(args.json, report)
        print(f"results: {args.json}")


if __name__ == "__main__":
    main()
