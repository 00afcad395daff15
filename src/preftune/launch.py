"""`preftune train --nproc N`: the same training command under torchrun, on this machine.

It is exactly `torchrun --standalone --nproc-per-node N -m preftune train CONFIG ...`, with
torchrun's agent running in this process so its outcome can be summed up in one line:
`--standalone` picks a free port, so two runs on one machine never collide, and a failed
worker ends with "preftune: rank R failed (exit code C)" instead of torchrun's own traceback.
Several machines: call torchrun yourself (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

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


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run `preftune train` in `nproc` processes on this machine; returns the exit status."""
    # torchrun's own default for several workers (one thread each, so N workers do not fight
    # over the cores), set here so it is not announced with a warning.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # The agent's warnings ("Sending process ... closing signal") only repeat what the failing
    # worker printed; its errors still show. Read when torch's elastic modules are imported.
    os.environ.setdefault("LOGLEVEL", "ERROR")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_args(nproc, argv))
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        others = len(e.failures) - 1
        also = f"; {others} other process{'es' if others > 1 else ''} stopped with it" if others else ""
        print(f"preftune: rank {rank} failed ({how}){also}.", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as e:  # Ctrl-C or a scheduler's SIGTERM: the workers were stopped
        print(f"preftune: stopped by {signal.Signals(e.sigval).name}.", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    return 0
