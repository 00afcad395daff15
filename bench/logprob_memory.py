"""Peak memory of the log-prob stage: chunked (preftune) vs naive (full logits + log-softmax).

    .venv/bin/python bench/logprob_memory.py                  # vocab 151,936, 8 x 2,048 tokens

The stage starts at the final hidden states (B, T, H) and the LM head, and ends when the
backward has produced their gradients. `LiveBytes` counts the bytes of every storage an
operation creates while any tensor still refers to it (autograd's saved tensors included),
and keeps the peak: a CPU-only stand-in for torch.cuda.max_memory_allocated. The naive side
(28 GiB at this size) runs under `FakeTensorMode`, where tensors have their real shapes and
dtypes but no data, so it is measured on any machine in a second; the chunked side selects
completion positions by value (a data-dependent shape fake tensors cannot have), so it runs
for real, with a small hidden size to keep it quick. Both give the same count at sizes where
both can run (tests/test_logprobs.py checks). The decoder before the stage is the same for
both sides and is left out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only


class LiveBytes(TorchDispatchMode):
    """Bytes of storages created inside the mode and still alive: `current` and `peak`."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, list[int]] = {}  # storage id -> [nbytes, tensors referring to it]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self._live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[key]

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata  # the StorageImpl: views share it, so they are counted once
        entry = self._live.get(key)
        if entry is None:
            entry = self._live[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        # The tensor object lives as long as its C++ tensor (PyTorch preserves the Python object
        # while autograd holds it), so this fires when the memory would really be freed.
        weakref.finalize(tensor, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out


def stage_peak_bytes(method: str, batch: int, length: int, hidden: int, vocab: int,
                     prompt: int = 1, fake: bool = False, chunk_size: int = 1024) -> int:
    """Peak bytes of one forward + backward of the log-prob stage by `method` (chunked|naive)."""
    from preftune.logprobs import logps_from_hidden, naive_logps_from_logits

    mode = contextlib.nullcontext()
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode()
    with mode:
        lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        states = torch.randn(batch, length, hidden, requires_grad=True)  # (B, T, H)
        input_ids = torch.randint(0, vocab, (batch, length))
        completion_mask = torch.ones(batch, length, dtype=torch.long)
        completion_mask[:, :prompt] = 0
        with LiveBytes() as meter:
            if method == "chunked":
                sums, _ = logps_from_hidden(states, lm_head, input_ids, completion_mask, chunk_size)
            else:
                logits = lm_head(states)  # (B, T, V)
                sums, _ = naive_logps_from_logits(logits, input_ids, completion_mask)
            sums.sum().backward()
    return meter.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--json")
    args = parser.parse_args()
    shape = {"batch": args.batch, "length": args.length, "hidden": args.hidden, "vocab": args.vocab}
    naive = stage_peak_bytes("naive", **shape, fake=True)
    chunked = stage_peak_bytes("chunked", **shape, chunk_size=args.chunk_size)
    result = {**shape, "chunk_size": args.chunk_size, "naive_peak_gib": naive / 2**30,
              "chunked_peak_gib": chunked / 2**30, "ratio": chunked / naive}
    print(f"log-prob stage, {args.batch} x {args.length} tokens, vocab {args.vocab}, hidden {args.hidden}: "
          f"naive {naive / 2**30:.2f} GiB, chunked {chunked / 2**30:.3f} GiB, ratio {chunked / naive:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
