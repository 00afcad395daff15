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
from pathlib import Path

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


def _error_file_text(failure) -> str:
    """The message a rank wrote to its error file: torchrun keeps the file's "message" entry,
    a dict in the layout rank_errors writes, or a plain string."""
    message = getattr(failure, "message", "")
    return str(message.get("message", "") if isinstance(message, dict) else message)


def describe_failures(failures: dict, first_rank: int, nproc: int) -> str:
    """One line for torchrun's failure records: the ranks that failed like the first one, and
    the ranks that were stopped because of it (torchrun's SIGTERM, a broken collective)."""
    first = failures[first_rank]
    end = f"signal {first.signal_name()}" if first.exitcode < 0 else f"exit code {first.exitcode}"
    # A rank that wrote its own error (rank_errors' file) failed too, though torchrun may have
    # killed it while it exited, after another rank's exit.
    failed = [r for r, f in failures.items()
              if f.exitcode == first.exitcode or _error_file_text(f).startswith(f"[rank {r}] error:")]
    stopped = [r for r in failures if r not in failed]
    line = f"{_ranks(failed)} of {nproc} failed ({end})"
    if stopped:
        line += f"; {_ranks(stopped)} stopped with {'it' if len(failed) == 1 else 'them'}"
    return line + "."


def reported_rank(failures: dict, first_rank: int) -> int:
    """The rank whose failure the summary and the exit status report. torchrun's first failure
    is the one with the earliest error-file time, to the second: ranks that meet the same
    mistake write theirs in the same second, so it may pick a rank that torchrun killed while
    that rank exited (signal SIGTERM, exit status 1 instead of the mistake's 2). A rank that
    wrote its own error and exited with its status is what happened."""
    if failures[first_rank].exitcode > 0:
        return first_rank
    exited = [r for r, f in failures.items()
              if f.exitcode > 0 and _error_file_text(f).startswith(f"[rank {r}] error:")]
    return min(exited, key=lambda r: failures[r].timestamp) if exited else first_rank


def _quiet_agent() -> None:
    """The agent logs each failure ("failed (exitcode: 2) local_rank: 1", "Sending process ...
    closing signal") after the worker has printed its own message; the one line that ends
    `launch_torchrun` says the same, once."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _child_pids() -> list[int]:
    """This process's children (torchrun's workers), read from /proc (Linux)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the name may hold ") "
        except (OSError, IndexError, ValueError):  # the process ended while we looked
            continue
        if ppid == os.getpid():
            pids.append(int(stat.parent.name))
    return pids


class StopForwarder:
    """SIGTERM (a scheduler's preemption) and Ctrl-C are passed on to the workers, and the agent
    keeps waiting for them: each finishes its step, checkpoints and exits 0, and so does the
    launcher. torchrun's own handler would stop the agent at once, wait at most 30 s for the
    workers, then exit 128 + the signal however cleanly they ended."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        from torch.distributed.elastic.multiprocessing.api import SignalException

        self.signal_exception = SignalException
        self.received: signal.Signals | None = None

    def install(self, args) -> None:
        """Our handlers for these two signals; `args` (torchrun's) keeps the agent's handlers,
        which it installs when it starts the workers, to the other signals (a torch without
        `--signals-to-handle` installs its own over ours: the old exit status)."""
        ours = {sig.name for sig in self.SIGNALS}
        handled = getattr(args, "signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT").split(",")
        args.signals_to_handle = ",".join(name for name in handled if name.strip() not in ours)
        for sig in self.SIGNALS:
            signal.signal(sig, self.forward)

    def forward(self, signum, frame) -> None:
        self.received = signal.Signals(signum)
        workers = _child_pids()
        if not workers:  # none started yet (or no /proc): torchrun's way, stop everything now
            raise self.signal_exception(f"got {self.received.name}", sigval=self.received)
        for pid in workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:  # it ended meanwhile
                pass


def ended_by(received: signal.Signals, exitcode: int) -> bool:
    """Whether a worker's exit status says it stopped because of the signal passed on to it:
    killed by it, or, for Ctrl-C, interrupted (status 128 + SIGINT: typer's, once the command
    runs, and `python -m preftune`'s while it imports)."""
    return exitcode in (-received, 128 + received)


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
    stop = StopForwarder()
    stop.install(args)
    try:
        run(args)
    except ChildFailedError as e:
        first_rank = reported_rank(e.failures, e.get_first_failure()[0])
        first = e.failures[first_rank]
        if stop.received and ended_by(stop.received, first.exitcode):  # before saving could start
            print(f"preftune: stopped by {stop.received.name}.", file=sys.stderr, flush=True)
            return 128 + int(stop.received)
        print(f"preftune: {describe_failures(e.failures, first_rank, nproc)}", file=sys.stderr, flush=True)
        return first.exitcode if first.exitcode > 0 else 1
    except SignalException as e:  # SIGHUP, SIGQUIT, or a signal before any worker started
        print(f"preftune: stopped by {signal.Signals(e.sigval).name}.", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    return 0
