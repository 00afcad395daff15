"""`preftune train --nproc N`: the same training command under torchrun, on this machine.

It is exactly `torchrun --standalone --nproc-per-node N -m preftune train CONFIG ...`, with
torchrun's agent running in this process so its outcome can be summed up in one line:
`--standalone` picks a free port, so two runs on one machine never collide, and a failed
worker ends with "preftune: rank R failed (exit code C)" instead of torchrun's own traceback.
Several machines: call torchrun yourself (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from preftune.errors import UserError


def worker_args(argv: list[str]) -> list[str]:
    """The arguments after `train` in `argv` (a full command line), without `--nproc`."""
    try:
        start = argv.index("train", 1) + 1
    except ValueError:
        raise UserError("--nproc is an option of `preftune train`.") from None
    kept, skip_value = [], False
    for arg in argv[start:]:
        if skip_value:
            skip_value = False
        elif arg == "--nproc":
            skip_value = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def torchrun_args(nproc: int, argv: list[str]) -> list[str]:
    return ["--standalone", "--nproc-per-node", str(nproc), "-m", "preftune", "train", *worker_args(argv)]


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, sorted(ranks)))}"


def describe_failures(failures: dict, first_rank: int, nproc: int) -> str:
    """One line for torchrun's failure records: the ranks that failed like the first one, and
    the ranks that were stopped because of it (torchrun's SIGTERM, a broken collective)."""
    first = failures[first_rank]
    end = f"signal {first.signal_name()}" if first.exitcode < 0 else f"exit code {first.exitcode}"
    failed = [r for r, f in failures.items() if f.exitcode == first.exitcode]
    stopped = [r for r in failures if r not in failed]
    line = f"{_ranks(failed)} of {nproc} failed ({end})"
    if stopped:
        line += f"; {_ranks(stopped)} stopped with {'it' if len(failed) == 1 else 'them'}"
    return line + "."


def _quiet_agent() -> None:
    """The agent logs each failure ("failed (exitcode: 2) local_rank: 1", "Sending process ...
    closing signal") after the worker has printed its own message; the one line that ends
    `launch_torchrun` says the same, once."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run `preftune train` in `nproc` processes on this machine; returns the exit status."""
    # torchrun's own default for several workers (one thread each, so N workers do not fight
    # over the cores), set here so it is not announced with a warning.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    _quiet_agent()
    args = get_args_parser().parse_args(torchrun_args(nproc, argv))
    try:
        run(args)
    except ChildFailedError as e:
        first_rank, first = e.get_first_failure()
        print(f"preftune: {describe_failures(e.failures, first_rank, nproc)}", file=sys.stderr, flush=True)
        return first.exitcode if first.exitcode > 0 else 1
    except SignalException as e:  # Ctrl-C or a scheduler's SIGTERM: the workers were stopped
        print(f"preftune: stopped by {signal.Signals(e.sigval).name}.", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    return 0
