"""Where training metrics go: always `metrics.jsonl`, optionally TensorBoard and W&B.

`metrics.jsonl` is the record `preftune report` reads (format in docs/CONTRACTS.md); the other
backends are views for people who already watch runs there. Only one process of a distributed
run should log: pass `enabled=(rank == 0)` and every other rank's logger does nothing at all.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.config import flat_config
from preftune.errors import UserError

if TYPE_CHECKING:  # typing.Self needs Python 3.11; annotations are never evaluated here
    from typing_extensions import Self

BACKENDS = ("jsonl", "tensorboard", "wandb")
METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars become Python numbers, so every backend can take them."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no NaN/inf; null keeps the line valid and the report skips the point.
        return None
    return value


def viewer_key(key: str) -> str:
    """A metric's name in TensorBoard and W&B: the one the HF Trainer's callbacks give TRL's
    logs there (`train/loss`, `train/rewards/chosen`, `eval/loss`), so that preftune's and TRL's
    runs share panels. metrics.jsonl keeps the bare names of TRL's log history."""
    return key if key.startswith(("train/", "eval/")) else f"train/{key}"


class MetricsLogger:
    """Log a dict of metrics per step to `output_dir/metrics.jsonl` and the chosen backends.

    backends: any of "jsonl", "tensorboard", "wandb"; "jsonl" is written whatever the list says.
    run_name, config_dict: the run's name and its resolved config, shown by TensorBoard (as
        text) and W&B (as the run config).
    wandb_project: the W&B project (default: $WANDB_PROJECT, else "preftune").
    enabled: False on every rank but 0 of a distributed run: nothing is created or written.

    `metrics.jsonl` is opened for appending, so a resumed run continues the same file. A run
    resumed from step `start_step` first drops the lines of later steps (logged by the run it
    continues after its checkpoint, and about to be logged again) and a line cut short by a
    kill, so each step is there once, as in TensorBoard; with `redo_eval_at_start` (a run
    resumed at its last step, which evaluates again) also the eval lines of `start_step`.
    Each line is flushed when written, so a killed run leaves every logged step readable.
    """

    def __init__(
        self,
        output_dir: str | Path,
        backends: Iterable[str] = ("jsonl",),
        run_name: str | None = None,
        config_dict: dict | None = None,
        enabled: bool = True,
        wandb_project: str | None = None,
        start_step: int = 0,
        redo_eval_at_start: bool = False,
    ):
        backends = list(backends)
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise UserError(
                f"unknown logger backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}."
            )
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self._file = None
        self._tensorboard = None
        self._wandb_run = None
        self._tensorboard_dir = self._wandb_dir = self._wandb_name = None
        self._wandb_next_step = 0
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        config_dict = config_dict or {}
        # The backends that can fail (not installed, not logged in) open first: a run that
        # cannot start must not leave a metrics.jsonl that makes its folder look like a run.
        if "wandb" in backends:
            self._wandb_run = _open_wandb(self.output_dir, run_name, config_dict, wandb_project,
                                          resumed=bool(start_step))
            if not getattr(self._wandb_run, "disabled", False):  # WANDB_MODE=disabled writes nothing
                self._wandb_dir = Path(self._wandb_run.dir).parent  # wandb/<offline-|>run-<time>-<id>
                self._wandb_name = self._wandb_run.name or self._wandb_run.id
                # A resumed W&B run already holds the steps before this (0 for a new or offline
                # run); it drops any step below, and warns.
                self._wandb_next_step = getattr(self._wandb_run, "starting_step", 0) or 0
        if "tensorboard" in backends:
            self._tensorboard = _open_tensorboard(self.output_dir, run_name, config_dict, start_step,
                                                  redo_eval_at_start)
            self._tensorboard_dir = Path(self._tensorboard.log_dir)
        if start_step:
            _drop_records_after(self.output_dir / METRICS_FILE, start_step, redo_eval_at_start)
        # Held open for the whole run (closed by close()), not one open per step.
        self._file = open(self.output_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115

    @property
    def path(self) -> Path:
        return self.output_dir / METRICS_FILE

    def where(self) -> list[str]:
        """Where this run's metrics can be read, one line per backend, for the run's summary."""
        if not self.enabled:
            return []
        lines = [f"metrics: {self.path}"]
        if self._tensorboard_dir is not None:
            lines.append(f"tensorboard: tensorboard --logdir {self._tensorboard_dir.parent}")
        if self._wandb_dir is not None:
            lines.append(f"wandb: {self._wandb_dir} (W&B run {self._wandb_name})")
        return lines

    def log(self, metrics: dict, step: int) -> None:
        """Write one record: `step` plus the metrics (numbers; None where not finite)."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricsLogger.log called after close()")
        record = {"step": int(step)}
        record.update({key: _plain(value) for key, value in metrics.items() if key != "step"})
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        numbers = _viewer_numbers(record)
        if self._tensorboard is not None:
            with self._viewer("tensorboard", step):
                for key, value in numbers.items():
                    self._tensorboard.add_scalar(key, value, global_step=step)
        # The steps a resume redoes after its checkpoint, which the W&B run already holds: W&B
        # keeps its values (documented), and logging them again would only make it warn
        # "Tried to log to step 21 that is less than the current step 34".
        if self._wandb_run is not None and step >= self._wandb_next_step:
            with self._viewer("wandb", step):
                self._wandb_run.log({**numbers, "train/global_step": step}, step=step)

    @contextlib.contextmanager
    def _viewer(self, backend: str, step: int | None = None):
        """TensorBoard and W&B are views of metrics.jsonl: one that fails mid-run (W&B's service
        process killed, a full disk under the event file) is turned off with one message, and
        the training run goes on, instead of dying with it hours in."""
        try:
            yield
        except Exception as e:  # whatever the backend raises, it must not stop training
            if backend == "tensorboard":
                self._tensorboard = None
            else:
                self._wandb_run = None
            when = f"at step {step}" if step is not None else "while closing"
            print(f"logger backend {backend!r} failed {when} ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200] if str(e) else 'no message'}) and is turned off for "
                  f"the rest of the run; {self.path} keeps every step.", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Flush and close every backend; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            with self._viewer("tensorboard"):
                self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            with self._viewer("wandb"):
                self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


_BACKEND_MODULES = {"tensorboard": ("torch.utils.tensorboard", "the tensorboard package"),
                    "wandb": ("wandb", "Weights & Biases")}


def _import_backend(backend: str):
    """The module a backend writes with, or one sentence saying how to install it."""
    import importlib

    module, package = _BACKEND_MODULES[backend]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"logger backend {backend!r} is chosen but {package} is not installed; run "
            f"`pip install 'preftune[{backend}]'` or remove it from train.loggers."
        ) from None


def check_backends(backends: Iterable[str], logs: bool = True) -> None:
    """Refuse, before a run loads its model and data, backends it could not open at its first
    step: an unknown name, a package that is not installed, an online W&B with no API key.
    `logs`: False on the ranks of a distributed run that do not log, which need no API key
    (another node may well have none)."""
    for backend in backends:
        if backend not in BACKENDS:
            raise UserError(f"unknown logger backend {backend!r}; choose from {', '.join(BACKENDS)}.")
        if backend in _BACKEND_MODULES:
            module = _import_backend(backend)
            if backend == "wandb":
                _check_wandb_environment(module)
                if logs:
                    _check_wandb_login(module)


# The variables wandb.init reads that a typo makes fail, with what each should hold.
_WANDB_VARIABLES = {"WANDB_MODE": ("mode", "online, offline or disabled"),
                    "WANDB_PROJECT": ("project", "the project's name alone (the team goes in WANDB_ENTITY)")}


def _check_wandb_environment(wandb) -> None:
    """A WANDB_MODE or WANDB_PROJECT that wandb.init would refuse is one sentence naming the
    variable, now: wandb says so with a pydantic traceback (a mode) or a message that names no
    variable (a project), and only once the model and data are loaded."""
    for variable, (setting, expected) in _WANDB_VARIABLES.items():
        value = os.environ.get(variable)
        if not value:
            continue
        try:
            wandb.Settings(**{setting: value})  # checks the value alone: no login, no network
        except (ValueError, wandb.errors.UsageError):  # pydantic's ValidationError is a ValueError
            raise UserError(f"the environment variable {variable}={value!r} is refused by wandb; "
                            f"set it to {expected}, or unset it.") from None


def _check_wandb_login(wandb) -> None:
    """An online W&B run with no API key where wandb looks for one (WANDB_API_KEY, .netrc, its
    settings files) and no terminal to ask for one on: wandb.init refuses it, but only once the
    model and data are loaded and `--overwrite` has deleted the earlier run, so say so now.

    The settings are read as wandb.setup reads them, into a Settings of our own: wandb.setup's
    singleton would keep them for the whole process. What this cannot tell (another wandb
    version's internals) passes, and wandb.init has the last word as before."""
    try:
        from wandb.errors import term
        from wandb.integration.sagemaker import is_using_sagemaker
        from wandb.sdk.lib.wbauth import HostUrl, wbnetrc

        settings = wandb.Settings(silent=True)  # silent: no "Loading settings from" line twice
        config_dir = os.environ.get("WANDB_CONFIG_DIR")
        settings.settings_system = str(Path(config_dir or "~/.config/wandb").expanduser() / "settings")
        settings.update_from_system_settings()  # where `wandb offline` writes its mode
        settings.update_from_env_vars(dict(os.environ))
        # wandb asks for the key at a terminal, unless WANDB_SILENT or WANDB_SHOW_INFO=false
        # silence it (term's own flags say so only once wandb.setup has run).
        quiet = wandb.Settings()
        quiet.update_from_env_vars(dict(os.environ))
        can_ask = term.can_use_terminput() and not quiet.silent and quiet.show_info
        if (settings.mode in ("offline", "dryrun", "disabled") or settings.api_key or os.environ.get("WANDB_IDENTITY_TOKEN_FILE")
                or is_using_sagemaker()  # wandb reads SageMaker's secrets too
                or wbnetrc.read_netrc_auth_with_source(host=HostUrl(settings.base_url)) or can_ask):
            return
    except Exception:  # wandb's internals moved: leave the question to wandb.init
        return
    raise UserError("train.loggers has wandb, and W&B is online (WANDB_MODE, else its default) but no "
                    "API key is configured and there is no terminal to ask for one; run `wandb login` "
                    "or set WANDB_API_KEY, set WANDB_MODE=offline to log locally and `wandb sync` later, "
                    "or drop wandb from train.loggers.")


def _drop_records_after(path: Path, step: int, evals_at_step: bool = False) -> None:
    """Rewrite `path` (atomically) without the records of steps after `step` (and the eval
    records of `step` itself when `evals_at_step`) and without a partial last line; lines
    without a numeric step are kept."""
    from preftune.records import read_records, write_jsonl_atomic

    if not path.exists():
        return
    records = read_records(path, repair=True)

    def stays(record: dict) -> bool:
        at = record.get("step")
        if not isinstance(at, (int, float)) or isinstance(at, bool) or at < step:
            return True
        return at == step and not (evals_at_step and any(k.startswith("eval/") for k in record))

    kept = [r for r in records if stays(r)]
    if len(kept) < len(records):  # (read_records has already cut a partial last line)
        write_jsonl_atomic(path, kept)  # a kill now leaves the old file or the new one


def _viewer_numbers(record: dict) -> dict:
    """A metrics.jsonl record's numbers under their TensorBoard and W&B names."""
    return {viewer_key(key): value for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def _make_log_dir(log_dir: Path) -> Path:
    """TensorBoard's folder, made here: a file in its way (OUT/tensorboard, say) is one sentence
    naming it, not a NotADirectoryError from deep inside tensorboard."""
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in (log_dir.parent, log_dir) if os.path.lexists(p) and not p.is_dir()), None)
        why = f"{blocker} is not a folder; move it away" if blocker else f"it cannot be made ({e.strerror}); fix that"
        raise UserError(f"train.loggers tensorboard writes to {log_dir}, but {why}, "
                        "or drop tensorboard from train.loggers.") from None
    return log_dir


def _open_tensorboard(output_dir: Path, run_name: str | None, config_dict: dict, start_step: int,
                      redo_eval_at_start: bool = False):
    SummaryWriter = _import_backend("tensorboard").SummaryWriter
    # A resumed run (start_step > 0) purges the steps logged after its checkpoint by the run
    # it continues, so TensorBoard shows each step once, as metrics.jsonl's reader does. One
    # that evaluates at start_step again purges that step too (a purge takes every tag, eval/
    # or not) and writes back the step's training line that metrics.jsonl keeps.
    log_dir = _make_log_dir(output_dir / "tensorboard" / (run_name or "run"))
    writer = SummaryWriter(log_dir=str(log_dir),
                           purge_step=(start_step if redo_eval_at_start else start_step + 1) or None)
    if start_step and redo_eval_at_start and (output_dir / METRICS_FILE).exists():
        from preftune.records import read_records

        for record in read_records(output_dir / METRICS_FILE, repair=True):
            if record.get("step") == start_step and not any(k.startswith("eval/") for k in record):
                for key, value in _viewer_numbers(record).items():
                    writer.add_scalar(key, value, global_step=start_step)
    if config_dict:
        # TensorBoard's text plugin renders markdown; a fenced block keeps the layout. A resume
        # may change some keys (max_steps, eval_every): its config is shown at the step it
        # starts from, beside the first launch's at 0, as W&B updates its run config.
        text = "```\n" + json.dumps(config_dict, indent=2, default=str) + "\n```"
        writer.add_text("config", text, global_step=start_step)
        # The HParams tab's row for this run (loss.beta, optim.lr, ...), to filter and sort runs
        # by setting beside their metrics. Only the session's values are written: an experiment
        # summary of our own (SummaryWriter.add_hparams writes one, in a folder of its own) would
        # hide the other runs' settings, while without one TensorBoard gathers every run's values
        # and takes their scalars as the metrics.
        from torch.utils.tensorboard.summary import hparams

        _, session_start, _ = hparams(_flat_settings(config_dict), {})
        writer.file_writer.add_summary(session_start)
    return writer


def _flat_settings(config: dict) -> dict:
    """A nested config as the HParams tab takes it: dotted keys (`loss.beta`) to a number or a
    string; lists and booleans as their JSON text (torch would write a bool as 1.0), None left
    out (the report's config table, from the same flat_config, keeps all three as they are)."""
    def plain(value) -> bool:
        return isinstance(value, (int, float, str)) and not isinstance(value, bool)

    return {key: value if plain(value) else json.dumps(value, default=str)
            for key, value in flat_config(config).items() if value is not None}


# The W&B run of a run folder, kept beside wandb's own files: a resumed run continues it.
WANDB_RUN_ID = Path("wandb") / "preftune-run-id"


def _open_wandb(output_dir: Path, run_name: str | None, config_dict: dict, project: str | None,
                resumed: bool = False):
    wandb = _import_backend("wandb")
    _check_wandb_environment(wandb)
    # wandb reads WANDB_MODE (online / offline / disabled) itself; an explicit project would
    # override WANDB_PROJECT, so the environment decides unless the caller named one. The same
    # for the name: wandb.init's name= beats WANDB_NAME, which HF users set to name a run.
    project = project or os.environ.get("WANDB_PROJECT", "preftune")
    run_name = os.environ.get("WANDB_NAME") or run_name
    id_file = output_dir / WANDB_RUN_ID
    # A resume continues the run's W&B run, not a new one per launch. W&B keeps what it already
    # has for the steps redone after the checkpoint (it ignores a step below its last one).
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
    try:
        run = wandb.init(project=project, name=run_name, config=config_dict, dir=str(output_dir),
                         id=run_id, resume="allow" if run_id else None)
    except wandb.errors.UsageError as e:  # not logged in, say
        raise UserError(f"wandb: {str(e).splitlines()[0]} (or set WANDB_MODE=offline to log locally and "
                        "`wandb sync` later).") from None
    except wandb.errors.CommError as e:  # no network, or the server did not answer in time
        raise UserError(f"wandb could not reach its server ({str(e).splitlines()[0][:200]}); set "
                        "WANDB_MODE=offline to log locally and `wandb sync` later.") from None
    # As the HF Trainer's W&B callback: every chart's x-axis is the optimizer step.
    run.define_metric("train/global_step")
    run.define_metric("*", step_metric="train/global_step", step_sync=True)
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run.id)
    return run
