"""Host work per optimizer step: operator launches and host-device synchronisations, on CPU.

On a GPU whose steps are short, the trainer that launches fewer kernels and never waits for the
device mid-step wins: each launch costs the host microseconds (tens of them under a virtualised
GPU driver), and each synchronisation (`.item()`, boolean-mask indexing, `nonzero`) stops the
host from queueing work ahead of the device. Both are properties of the code, not of the chip,
so they can be counted exactly on a CPU: every ATen operator that reaches a backend (views and
other metadata-only operators excluded) would be one or more kernel launches on CUDA.

    .venv/bin/python bench/host_ops.py                       # the Qwen2.5-0.5B layer structure
    .venv/bin/python bench/host_ops.py --configs preftune,preftune-lean-compile,trl --json bench/results/host-ops.json

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

    # The interface both counters share: around the whole run, at each step's end, the result.
    def active(self):
        self.snapshots = []
        return self.mode

    def step_end(self) -> None:
        self.snapshots.append(self.snapshot())

    def result(self, warmup: int) -> dict:
        """Mean counts over the steps after `warmup`, from one snapshot at the end of every step."""
        measured = self.snapshots[warmup - 1:]
        steps = len(measured) - 1
        first, last = measured[0], measured[-1]
        top = ((last[2] - first[2]).most_common(12))
        return {"method": "dispatch", "launches_per_step": (last[0] - first[0]) / steps,
                "syncs_per_step": (last[1] - first[1]) / steps,
                "top_per_step": {k: v / steps for k, v in top},
                "syncs_by_op_per_step": {k: v / steps for k, v in (last[3] - first[3]).items()}}


# Operators that launch nothing: views, allocations, scalar reads, metadata.
NO_KERNEL = {"aten::" + name for name in (
    "t", "reshape", "view", "transpose", "detach", "detach_", "slice", "narrow", "unsqueeze", "expand",
    "select", "lift_fresh", "alias", "permute", "squeeze", "as_strided", "split", "split_with_sizes",
    "chunk", "unbind", "_unsafe_view", "_reshape_alias", "view_as", "expand_as", "flatten", "unflatten",
    "contiguous", "movedim", "empty", "empty_like", "empty_strided", "resize_", "result_type", "set_",
    "_local_scalar_dense", "item", "is_nonzero", "stride", "size", "numpy_T",
    "_has_compatible_shallow_copy_type")}
HOST_SIDE = "host_ops: batch built on the host"


class LaunchProfiler:
    """Kernel launches per step from torch.profiler, which (unlike a dispatch mode) leaves
    torch.compile on: every operator called from Python or from a compiled graph's wrapper
    (its matmuls, attention) that is not nested in another and launches something, plus each
    fused kernel inductor generated (profiled through `cpp.enable_kernel_profile`). A composite
    operator (a mean, a cross-entropy) counts once here, so on eager steps it counts 13% below
    OpCounter for preftune's step and 21% below for TRL's; compare counts of one method.
    Inductor's CPU kernels stand in for the Triton kernels it would generate on CUDA: the same
    graphs, fused by the same scheduler."""

    def __init__(self, warmup: int, total: int):
        import torch._inductor.config as inductor_config
        from torch.profiler import ProfilerActivity, profile

        inductor_config.cpp.enable_kernel_profile = True
        self.profiler = profile(activities=[ProfilerActivity.CPU])
        self.warmup, self.total, self.steps_seen = warmup, total, 0

    def active(self):
        import contextlib

        return contextlib.nullcontext()

    def paused_in(self, fn):
        import torch

        def wrapped(*args, **kwargs):
            with torch.profiler.record_function(HOST_SIDE):
                return fn(*args, **kwargs)
        return wrapped

    def step_end(self) -> None:
        self.steps_seen += 1
        if self.steps_seen == self.warmup:
            self.profiler.start()
        elif self.steps_seen == self.total:
            self.profiler.stop()

    def result(self, warmup: int) -> dict:
        def kernel(event) -> bool:
            return event.name.startswith("aten::") or "cpp_fused" in event.name

        events = self.profiler.events()
        has_children = {id(event.cpu_parent) for event in events if event.cpu_parent is not None}
        names: collections.Counter = collections.Counter()
        for event in events:
            if not kernel(event) or event.name in NO_KERNEL:
                continue
            if event.name == "aten::to" and id(event) not in has_children:
                continue  # already of that dtype and device: returns itself, copies nothing
            parent, nested = event.cpu_parent, False
            while parent is not None and not nested:
                nested = kernel(parent) or parent.name == HOST_SIDE
                parent = parent.cpu_parent
            if not nested:
                names["inductor fused kernel" if "cpp_fused" in event.name else event.name] += 1
        steps = self.total - self.warmup
        return {"method": "profiler", "launches_per_step": sum(names.values()) / steps,
                "top_per_step": {k: v / steps for k, v in names.most_common(12)}}


def make_counter(method: str):
    total = SHAPE["warmup"] + SHAPE["steps"]
    return OpCounter() if method == "dispatch" else LaunchProfiler(SHAPE["warmup"], total)


def count_preftune(workdir: Path, overrides: list[str], counter) -> dict:
    import preftune.data.collate
    import preftune.loggers
    import preftune.train
    from preftune.config import load_config
    from preftune.train import train

    original_log = preftune.loggers.MetricsLogger.log

    def log(self, metrics, step=None):  # the end of an optimizer step
        counter.step_end()
        return original_log(self, metrics, step=step)

    original_to, original_choose = preftune.data.collate.PairBatch.to, preftune.train.choose_collate
    preftune.loggers.MetricsLogger.log = log
    # Collation and the host-side part of PairBatch.to (counted positions, token count).
    preftune.data.collate.PairBatch.to = counter.paused_in(original_to)
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
    try:
        with counter.active():
            train(config)
    finally:
        preftune.loggers.MetricsLogger.log = original_log
        preftune.data.collate.PairBatch.to, preftune.train.choose_collate = original_to, original_choose
    return counter.result(SHAPE["warmup"])


def count_trl(workdir: Path, gradient_checkpointing: bool, counter, lora: bool = False) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            counter.step_end()

    rows = [json.loads(line) for line in (workdir / "pairs.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype="float32")
    args = DPOConfig(output_dir=str(workdir / "out-trl"), per_device_train_batch_size=SHAPE["batch"],
                     max_steps=SHAPE["warmup"] + SHAPE["steps"], learning_rate=1e-6, logging_steps=1,
                     save_strategy="no", report_to="none", max_length=None, use_cpu=True, bf16=True,
                     gradient_checkpointing=gradient_checkpointing, disable_tqdm=True,
                     optim="adamw_torch_fused", dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=[Snapshot()],
                         peft_config=bench_dpo.trl_peft_config() if lora else None)
    trainer.data_collator = counter.paused_in(trainer.data_collator)
    with counter.active():
        trainer.train()
    return counter.result(SHAPE["warmup"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="preftune,preftune-lean,trl",
                        help=f"comma-separated, from: {', '.join(bench_dpo.CONFIGS)}")
    parser.add_argument("--preftune-override", dest="overrides", action="append", default=[])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--top", action="store_true", help="print the most frequent operators")
    parser.add_argument("--method", choices=["dispatch", "profiler"],
                        help="how to count (default: dispatch, profiler for compiled runs)")
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
            overrides = options.get("overrides", []) + args.overrides
            # A dispatch mode turns torch.compile off, so compiled runs are profiled instead.
            method = args.method or ("profiler" if "model.compile=true" in overrides else "dispatch")
            counter = make_counter(method)
            if trainer == "preftune":
                results[name] = count_preftune(workdir, overrides, counter)
            else:
                results[name] = count_trl(workdir, options["gradient_checkpointing"], counter,
                                          options.get("lora", False))
            r = results[name]
            syncs = f"{r['syncs_per_step']:>6.0f} syncs/step {r['syncs_by_op_per_step']}" if "syncs_per_step" in r else ""
            print(f"{name:<24} {r['launches_per_step']:>8.0f} launches/step ({method}) {syncs}", flush=True)
            if args.top:
                print("   ", r["top_per_step"])
    for name, r in results.items():
        for other, o in results.items():
            if name.startswith("preftune") and not other.startswith("preftune"):
                print(f"{name} / {other}: {r['launches_per_step'] / o['launches_per_step']:.2f}x the launches")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": SHAPE, "overrides": args.overrides,
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
