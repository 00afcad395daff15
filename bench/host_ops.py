"""Host work per optimizer step: operator launches and host-device synchronisations, on CPU.

On a GPU whose steps are short, the trainer that launches fewer kernels and never waits for the
device mid-step wins: each launch costs the host microseconds (tens of them under a virtualised
GPU driver), and each synchronisation (`.item()`, boolean-mask indexing, `nonzero`) stops the
host from queueing work ahead of the device. Both are properties of the code, not of the chip,
so they can be counted exactly on a CPU: every ATen operator that reaches a backend (views and
other metadata-only operators excluded) would be one or more kernel launches on CUDA.

    .venv/bin/python bench/host_ops.py                       # the Qwen2.5-0.5B layer structure
    .venv/bin/python bench/host_ops.py --configs preftune-lean,trl --json bench/results/host-ops.json

The model has the 0.5B shape's structure (24 layers, 14 query and 2 key/value heads, tied
embeddings) at tiny widths, so a step takes a fraction of a second; the counts do not depend on
the widths. Both trainers run as they would on a GPU: fused AdamW, bf16 autocast, and for
preftune no prompt sharing (`data.share_prompt: auto` on CUDA; add
`--preftune-override data.share_prompt=true` to count it). Host-to-device copies, which
synchronise unless made from pinned memory, cannot be seen on a CPU and are not counted.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_dpo  # noqa: E402  (the shared model, data and trainer set-ups)

SHAPE = {"hidden": 112, "layers": 24, "heads": 14, "kv_heads": 2, "intermediate": 192, "vocab": 1024,
         "tied": True, "prompt_len": 16, "response_len": 32, "batch": 4, "warmup": 2, "steps": 3,
         "rounds": 1, "autocast": "bfloat16"}

# Operators that make the host wait for the device on CUDA: a scalar read, or an output whose
# size depends on the data.
SYNCING = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique",
           "aten._unique2", "aten.unique_consecutive", "aten.is_nonzero", "aten.equal",
           "aten.repeat_interleave"}


def _is_view(func) -> bool:
    """Operators returning an alias of an input without writing it launch no kernel."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class OpCounter:
    """A dispatch mode counting backend operators, and those that would synchronise on CUDA."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.record(func, args)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.paused = False
        self.ops = 0
        self.syncs = 0
        self.by_name: collections.Counter = collections.Counter()
        self.sync_names: collections.Counter = collections.Counter()

    def record(self, func, args) -> None:
        import torch

        name = str(func.overloadpacket)  # e.g. "aten.mm"
        if self.paused or _is_view(func) or name in ("aten.detach", "aten.lift_fresh", "aten._unsafe_view"):
            return
        self.ops += 1
        self.by_name[name] += 1
        syncing = name in SYNCING
        if name == "aten.index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                        for i in (args[1] if len(args) > 1 else []) if i is not None):
            syncing = True  # boolean-mask indexing runs nonzero inside
        if syncing:
            self.syncs += 1
            self.sync_names[name] += 1

    def paused_in(self, fn):
        """`fn` with counting off: batches are built on the host, in either trainer, before
        they go to the device; their operators would be CPU work beside any GPU."""
        def wrapped(*args, **kwargs):
            self.paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused = False
        return wrapped

    def snapshot(self):
        return self.ops, self.syncs, collections.Counter(self.by_name), collections.Counter(self.sync_names)


def per_step(snapshots, warmup: int) -> dict:
    """Mean counts over the steps after `warmup`, from one snapshot at the end of every step."""
    measured = snapshots[warmup - 1:]
    steps = len(measured) - 1
    first, last = measured[0], measured[-1]
    ops = (last[0] - first[0]) / steps
    syncs = (last[1] - first[1]) / steps
    top = ((last[2] - first[2]).most_common(12))
    return {"ops_per_step": ops, "syncs_per_step": syncs,
            "top_ops_per_step": {k: v / steps for k, v in top},
            "syncs_by_op_per_step": {k: v / steps for k, v in (last[3] - first[3]).items()}}


def count_preftune(workdir: Path, overrides: list[str]) -> dict:
    import preftune.data.collate
    import preftune.loggers
    import preftune.train
    from preftune.config import load_config
    from preftune.train import train

    counter = OpCounter()
    snapshots = []
    original_log = preftune.loggers.MetricsLogger.log

    def log(self, metrics, step=None):  # the end of an optimizer step
        snapshots.append(counter.snapshot())
        return original_log(self, metrics, step=step)

    preftune.loggers.MetricsLogger.log = log
    # Collation and the host-side part of PairBatch.to (counted positions, token count).
    preftune.data.collate.PairBatch.to = counter.paused_in(preftune.data.collate.PairBatch.to)
    original_choose = preftune.train.choose_collate
    preftune.train.choose_collate = lambda *a, **k: counter.paused_in(original_choose(*a, **k))
    total = SHAPE["warmup"] + SHAPE["steps"]
    config = load_config(None, [
        f"model.path={workdir / 'model'}", "model.autocast=bfloat16",
        f"data.train={workdir / 'pairs.jsonl'}", "data.max_length=null", "optim.fused=true",
        "data.share_prompt=false",  # what data.share_prompt: auto means on a GPU
        f"train.batch_size={SHAPE['batch']}", f"train.max_steps={total}", "train.device=cpu",
        f"train.output_dir={workdir / 'out-preftune'}", "train.progress=false", "train.report=false",
        *overrides])
    shutil.rmtree(workdir / "out-preftune", ignore_errors=True)
    with counter.mode:
        train(config)
    return per_step(snapshots, SHAPE["warmup"])


def count_trl(workdir: Path, gradient_checkpointing: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    counter = OpCounter()
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append(counter.snapshot())

    rows = [json.loads(line) for line in (workdir / "pairs.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype="float32")
    args = DPOConfig(output_dir=str(workdir / "out-trl"), per_device_train_batch_size=SHAPE["batch"],
                     max_steps=SHAPE["warmup"] + SHAPE["steps"], learning_rate=1e-6, logging_steps=1,
                     save_strategy="no", report_to="none", max_length=None, use_cpu=True, bf16=True,
                     gradient_checkpointing=gradient_checkpointing, disable_tqdm=True,
                     optim="adamw_torch_fused", dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[Snapshot()])
    trainer.data_collator = counter.paused_in(trainer.data_collator)
    with counter.mode:
        trainer.train()
    return per_step(snapshots, SHAPE["warmup"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="preftune,preftune-lean,trl",
                        help=f"comma-separated, from: {', '.join(bench_dpo.CONFIGS)}")
    parser.add_argument("--preftune-override", dest="overrides", action="append", default=[])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--top", action="store_true", help="print the most frequent operators")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    bench_dpo.SEED = 0
    results = {}
    with tempfile.TemporaryDirectory(prefix="preftune-hostops-") as tmp:
        workdir = Path(tmp)
        bench_dpo.write_model(workdir / "model", SHAPE)
        bench_dpo.write_pairs(workdir / "pairs.jsonl", SHAPE, (SHAPE["warmup"] + SHAPE["steps"]) * SHAPE["batch"])
        for name in args.configs.split(","):
            trainer, options = bench_dpo.CONFIGS[name]
            if trainer == "preftune":
                results[name] = count_preftune(workdir, options["overrides"] + args.overrides)
            else:
                results[name] = count_trl(workdir, options["gradient_checkpointing"])
            r = results[name]
            print(f"{name:<24} {r['ops_per_step']:>8.0f} operators/step {r['syncs_per_step']:>6.0f} syncs/step "
                  f"{r['syncs_by_op_per_step']}", flush=True)
            if args.top:
                print("   ", r["top_ops_per_step"])
    for name, r in results.items():
        for other, o in results.items():
            if name.startswith("preftune") and not other.startswith("preftune"):
                print(f"{name} / {other}: {r['ops_per_step'] / o['ops_per_step']:.2f}x the operators")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": SHAPE, "overrides": args.overrides,
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
