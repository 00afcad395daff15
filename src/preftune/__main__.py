"""Where every `preftune` process starts: the `preftune` command ([project.scripts] in
pyproject.toml) and `python -m preftune`, as torchrun starts each process of `preftune train
--nproc N`.

Only the standard library is imported before `main` runs, so that a Ctrl-C while preftune.cli
imports (typer, pydantic) is caught here instead of printing the traceback of whichever module
was loading. Commands import torch and transformers when they run; a Ctrl-C there ends them as
typer ends any stopped command, with status 130.
"""

import os
import sys

STOPPED_WHILE_STARTING = "preftune: stopped by Ctrl-C while starting; nothing was done."


def main() -> None:
    try:
        from preftune.cli import main as run_command
    except KeyboardInterrupt:
        # Status 130, as typer ends a command stopped by Ctrl-C once it runs. Ctrl-C reaches
        # every process of a distributed run, and there the launcher says "stopped by SIGINT"
        # once for all of them, so a worker ends without a word.
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            print(STOPPED_WHILE_STARTING, file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    run_command()


if __name__ == "__main__":
    main()
