"""`python -m preftune`, as torchrun starts each process of `preftune train --nproc N`."""

import os

try:
    from preftune.cli import main
except KeyboardInterrupt:
    # Ctrl-C reaches every process of a run, and the imports take seconds: the launcher says
    # "stopped by SIGINT" once, where each process printed the traceback of the module it was
    # importing. Status 130, as typer ends a command stopped by Ctrl-C once it runs.
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise
    raise SystemExit(130) from None

main()
