"""`preftune demo`: the whole DPO loop offline, a miniature of the paper's sentiment experiment.

Rafailov et al. (2023, section 6.1) fine-tune GPT-2 on IMDb reviews, let a sentiment classifier
stand in for people, and show that DPO reaches higher reward than other methods at the same
KL(pi || pi_sft). This module strings preftune's own pieces together on the synthetic review
world of `preftune.demo.world`, each step being the library call behind one CLI command:

1. world: training and held-out review openings (prompts) written to the output folder;
2. pi_sft: a tokenizer and a small Llama-style model trained from scratch (`demo.pretrain`);
3. `preftune sample`: two continuations per training prompt from pi_sft -> pairs.jsonl;
4. `preftune label auto --bt-sample`: the latent reward picks through Bradley-Terry -> D.jsonl
   (or people in the browser, `demo.human`);
5. `preftune train`: DPO at several betas against a frozen pi_sft, and Preferred-FT (plain
   fine-tuning on the chosen responses, no reference) as the baseline;
6. `preftune eval generate`: every model against pi_sft on held-out prompts, judged by the
   latent reward: mean reward, win rate, KL(pi || pi_sft), length;
7. the summary (demo.json) and report (report.html), written by `demo.summary`.

Every step writes its outputs into the output folder and is skipped on a rerun when they are
complete, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from preftune.demo import world
from preftune.demo.pretrain import FULL, QUICK, PretrainConfig
from preftune.errors import UserError
from preftune.records import write_text_atomic
from preftune.wording import counted

REWARD_SPEC = "preftune.demo.world:sentiment_rewards"
JUDGE_SPEC = f"reward:{REWARD_SPEC}"
Echo = Callable[[str], None]


@dataclass(frozen=True)
class DemoSizes:
    """Sizes and hyper-parameters of one demo run; `FULL_SIZES` and `QUICK_SIZES` are presets.

    The full preset was tuned on this task (README, "The demo"): DPO at lr 5e-4 for 2 epochs
    over 2048 pairs puts beta 0.1, 0.5 and 1 at KL of about 10, 3 and 1.6 nats. Preferred-FT's
    reward stays near 0.6 whatever its learning rate (5e-4 to 3e-3) while its KL grows with it;
    3e-3 moves it closest to DPO's KL range, where the two can be compared.
    """

    pretrain: PretrainConfig = FULL
    train_prompts: int = 2048  # one sampled pair each: |D|
    heldout_prompts: int = 256  # evaluation prompts (the held-out openings, repeated)
    max_new_tokens: int = 48  # pi_sft's continuations average about 20 tokens
    sample_batch_size: int = 64
    betas: tuple[float, ...] = (0.1, 0.5, 1.0)
    dpo_lr: float = 5e-4
    sft_lr: float = 3e-3
    epochs: int = 2
    batch_size: int = 32
    max_length: int = 128
    seed: int = 0


FULL_SIZES = DemoSizes()
QUICK_SIZES = replace(
    FULL_SIZES, pretrain=QUICK, train_prompts=256, heldout_prompts=64, max_new_tokens=32,
    betas=(0.1,), dpo_lr=1e-3, batch_size=16,
)


@dataclass
class DemoPaths:
    """Where every artefact of a demo lives, below one output folder."""

    out: Path

    def __post_init__(self):
        self.out = Path(self.out)

    pi_sft = property(lambda self: self.out / "pi_sft")
    train_prompts = property(lambda self: self.out / "prompts_train.jsonl")
    heldout_prompts = property(lambda self: self.out / "prompts_heldout.jsonl")
    pairs = property(lambda self: self.out / "pairs.jsonl")
    dataset = property(lambda self: self.out / "D.jsonl")
    labels_db = property(lambda self: self.out / "labels.sqlite")
    runs = property(lambda self: self.out / "runs")
    summary = property(lambda self: self.out / "demo.json")
    report = property(lambda self: self.out / "report.html")


# Entries only a demo writes: a folder holding one of them is an earlier demo's. (runs/, plots/
# and report.html are left out: a `preftune train` folder has them too.)
DEMO_ENTRIES = ("prompts_train.jsonl", "prompts_heldout.jsonl", "pi_sft", "pairs.jsonl", "D.jsonl",
                "labels.sqlite", "demo.json")


def check_out_folder(out: Path) -> bool:
    """True when `out` holds an earlier demo (which this one continues), False when it is new or
    empty; a file, or a folder of other things, is refused before any work."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the demo's files (it is created "
                        "if missing).")
    # A file above it would stop the folder's creation in step 1 with a NotADirectoryError.
    file_above = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if file_above is not None:
        raise UserError(f"--out {out} is inside {file_above}, a file; give a folder for the "
                        "demo's files (it is created if missing).")
    if not out.is_dir():
        return False
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if not entries:
        return False
    if any(name in DEMO_ENTRIES for name in entries):
        return True
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise UserError(f"--out {out} already holds other files ({shown}) and no earlier demo; give a "
                    "new or empty folder, so that the demo's files do not mix with them.")


class DemoStopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the demo; what it finished is on disk and a rerun continues."""


class _Terminated(BaseException):
    """SIGTERM outside training (where `preftune train` handles it itself)."""


@contextmanager
def stops_cleanly(timer: StepTimer, out: Path, command: str) -> Iterator[None]:
    """Turn Ctrl-C and SIGTERM into one `DemoStopped` that names the step and the way on."""
    def terminate(signum, frame):
        raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (a test, a notebook worker): leave signals alone
        previous = None
    try:
        yield
    except (KeyboardInterrupt, _Terminated) as stop:
        detail = f" ({stop})" if isinstance(stop, DemoStopped) and str(stop) else ""
        raise DemoStopped(
            f"stopped during step {timer.current}/{timer.total}{detail}; what the steps before it "
            f"wrote is kept in {out}. Run the same command again to continue: {command}") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@dataclass
class Run:
    """One trained model of the demo: DPO at one beta, or the Preferred-FT baseline."""

    name: str
    method: str  # "DPO" or "Preferred-FT", the report's grouping
    beta: float | None
    folder: Path
    seconds: float | None = None

    @property
    def final(self) -> Path:
        return self.folder / "final"


def planned_runs(paths: DemoPaths, betas: tuple[float, ...]) -> list[Run]:
    runs = [Run(f"dpo-beta{b:g}", "DPO", b, paths.runs / f"dpo-beta{b:g}") for b in betas]
    return runs + [Run("preferred-ft", "Preferred-FT", None, paths.runs / "preferred-ft")]


@dataclass
class StepTimer:
    """Prints each numbered step as it starts and how long it took; keeps the times."""

    echo: Echo
    total: int = 7
    seconds: dict[str, float] = field(default_factory=dict)
    current: int = 0  # the step running now, for the message of an interrupted demo

    def run(self, number: int, key: str, title: str, fn: Callable[[], str | None]):
        self.current = number
        self.echo(f"\n[{number}/{self.total}] {title}")
        start = time.perf_counter()
        note = fn()
        self.seconds[key] = round(time.perf_counter() - start, 2)
        self.echo(f"      {note + ', ' if note else ''}{self.seconds[key]:.1f} s")


# ------------------------------------------------------------------ steps 1-4: data


def write_prompts(paths: DemoPaths, sizes: DemoSizes) -> str:
    """Step 1: the world's training and held-out openings as prompt files (`preftune sample`'s)."""
    paths.out.mkdir(parents=True, exist_ok=True)
    for path, n, split in ((paths.train_prompts, sizes.train_prompts, "train"),
                           (paths.heldout_prompts, sizes.heldout_prompts, "heldout")):
        lines = [json.dumps({"prompt": p}) + "\n" for p in world.make_prompts(n, split, sizes.seed)]
        write_text_atomic(path, "".join(lines))
    return (f"{sizes.train_prompts} training prompts from {len(world.review_openings('train'))} "
            f"openings, {sizes.heldout_prompts} evaluation prompts from "
            f"{len(world.review_openings('heldout'))} held-out openings")


def pi_sft_is_complete(folder: Path) -> bool:
    """pretrain.json is written last, after the weights and tokenizer."""
    return (folder / "pretrain.json").is_file() and (folder / "config.json").is_file()


def check_pi_sft(paths: DemoPaths, sizes: DemoSizes) -> None:
    """Refuse a folder whose pi_sft has other settings: everything after it (pairs, D, runs)
    came from that model. Checked before step 1 too, which would rewrite the prompt files."""
    if not pi_sft_is_complete(paths.pi_sft):
        return
    saved = json.loads((paths.pi_sft / "pretrain.json").read_text())
    if saved.get("config") != asdict(sizes.pretrain):
        raise UserError(f"{paths.pi_sft} was trained with other settings than this demo's "
                        "(a --quick run in a full-size folder, or another --seed); choose "
                        "another --out or delete that folder.")


def check_not_moved(paths: DemoPaths) -> None:
    """Refuse an earlier demo's folder that was moved or copied here: its pairs.jsonl names
    pi_sft by the old path, so step 3 would stop with 'written by another job'."""
    from preftune.records import recorded_path

    try:
        with paths.pairs.open(encoding="utf-8") as f:
            recorded = json.loads(f.readline()).get("model")
    except (OSError, ValueError, AttributeError):  # no pairs yet, or a line step 3 reports
        return
    if (isinstance(recorded, str) and Path(recorded).name == "pi_sft"
            and recorded not in {str(paths.pi_sft), recorded_path(paths.pi_sft)}):
        raise UserError(f"{paths.out} holds a demo made in {Path(recorded).parent} (its "
                        f"{paths.pairs.name} names pi_sft there), so it cannot be continued here; "
                        "move it back to continue it, or give a new --out.")


def train_pi_sft(paths: DemoPaths, sizes: DemoSizes, progress: bool, echo: Echo = print) -> str:
    """Step 2: tokenizer and pi_sft from scratch, unless a complete one is already there; a
    training an earlier demo was stopped in resumes from its last save (to the same weights)."""
    from preftune.demo.pretrain import PROGRESS_FILE, pretrain_sft

    if pi_sft_is_complete(paths.pi_sft):
        check_pi_sft(paths, sizes)
        (paths.pi_sft / PROGRESS_FILE).unlink(missing_ok=True)  # a stop just after pretrain.json
        return f"kept the pi_sft already in {paths.pi_sft}"
    summary = pretrain_sft(paths.pi_sft, sizes.pretrain, progress=progress,
                           echo=lambda message: echo(f"      {message}"))
    return (f"{summary['parameters'] / 1e6:.2f}M parameters, final loss "
            f"{summary['final_loss']:.3f}")


def sample_pairs_step(paths: DemoPaths, sizes: DemoSizes, progress: bool) -> str:
    """Step 3: `preftune sample` of two continuations per training prompt (resumes)."""
    from preftune.sampling import SamplingSettings, sample_to_file

    settings = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=sizes.max_new_tokens,
                                seed=sizes.seed, n=2)
    kept, written = sample_to_file(str(paths.pi_sft), paths.train_prompts, paths.pairs, settings,
                                   batch_size=sizes.sample_batch_size, progress=progress)
    return f"{written} pairs sampled, {kept} kept from before -> {paths.pairs}"


def label_pairs_step(paths: DemoPaths, sizes: DemoSizes, progress: bool) -> str:
    """Step 4: `preftune label auto --bt-sample` with the latent sentiment reward (resumes)."""
    from preftune.demo.human import voted_pairs
    from preftune.labeling.auto import label_auto
    from preftune.records import read_records

    if paths.dataset.is_file() and any("votes" in row for row in read_records(paths.dataset)[:1]):
        raise UserError(f"{paths.dataset} holds your votes from a `preftune demo --human` run; add "
                        "--human to continue with them, or choose another --out.")
    # A --human run stopped before its D.jsonl (too few preferences, Ctrl-C) keeps the votes in
    # labels.sqlite only; machine labels here would leave them out without a word.
    voted = 0 if paths.dataset.is_file() else voted_pairs(paths.labels_db)
    if voted:
        raise UserError(f"{paths.labels_db} holds your votes on {counted(voted, 'pair')} from a "
                        "`preftune demo --human` run; add --human to continue with them, or choose another --out.")
    stats = label_auto(paths.pairs, REWARD_SPEC, paths.dataset, mode="bt-sample",
                       seed=sizes.seed, show_progress=progress)
    rows = [json.loads(line) for line in paths.dataset.read_text().splitlines() if line.strip()]
    agree = sum((r["r1"] > r["r2"]) == (r["chosen_index"] == 0) for r in rows) / max(1, len(rows))
    empty = f", {stats['empty_skipped']} pairs with an empty response left out" \
        if stats.get("empty_skipped") else ""
    return (f"{len(rows)} preferences in {paths.dataset} ({stats.get('written', 0)} new{empty}); "
            f"{agree:.0%} of them chose the higher-reward response")


# ------------------------------------------------------------------ step 5: training


def training_config(run: Run, paths: DemoPaths, sizes: DemoSizes, progress: bool) -> dict:
    """The `preftune train` config of one run, as a dict (saved as the run's config.yaml)."""
    dpo = run.method == "DPO"
    return {
        # DPO's reference is pi_sft; its log-probs are computed once, before the first step.
        "model": {"path": str(paths.pi_sft), "reference": "precompute" if dpo else "none"},
        "data": {"train": str(paths.dataset), "max_length": sizes.max_length},
        "loss": {"type": "sigmoid", "beta": run.beta} if dpo else {"type": "sft"},
        "optim": {"lr": sizes.dpo_lr if dpo else sizes.sft_lr, "scheduler": "cosine",
                  "warmup_steps": 2},
        "train": {"batch_size": sizes.batch_size, "epochs": sizes.epochs, "seed": sizes.seed,
                  "output_dir": str(run.folder), "progress": progress, "report": True},
    }


def train_run(run: Run, paths: DemoPaths, sizes: DemoSizes, progress: bool) -> str:
    """`preftune train` for one run, unless its final policy already exists; a run an earlier
    demo was stopped in resumes from its checkpoint."""
    from preftune.checkpoint import latest_good_checkpoint
    from preftune.config import validate_config
    from preftune.train import train

    if run.final.is_dir():  # written atomically by train: present means complete
        return f"{run.name}: kept {run.final}"
    config = validate_config(training_config(run, paths, sizes, progress), f"demo run {run.name}")
    start = time.perf_counter()
    checkpoint = latest_good_checkpoint(run.folder)
    if checkpoint is not None:  # Ctrl-C or SIGTERM stopped it there
        train(config, resume=True)
    else:  # never started, or killed before a checkpoint: start over (the reference cache stays)
        train(config, overwrite=True)
    if not run.final.is_dir():
        # A signal: train finished the step, saved a checkpoint and returned without final/.
        found = latest_good_checkpoint(run.folder)
        raise DemoStopped(f"{run.name} stopped at its checkpoint {found.name if found else '-'}, "
                          "where the rerun resumes it")
    run.seconds = round(time.perf_counter() - start, 2)
    resumed = f", resumed from {checkpoint.name}" if checkpoint is not None else ""
    return f"{run.name}: {run.seconds:.1f} s{resumed}"


def share_reference_cache(runs: list[Run]) -> None:
    """The DPO runs share pi_sft and D, hence the reference log-probs: copy the first run's
    cache (keyed by model weights and token ids, so a stale one is never used) to the others."""
    from preftune.reference import CACHE_DIR

    caches = [r.folder / CACHE_DIR for r in runs if r.method == "DPO"]
    source = next((c for c in caches if c.is_dir()), None)
    for target in caches:
        if source is not None and not target.exists():
            shutil.copytree(source, target)


def train_all(runs: list[Run], paths: DemoPaths, sizes: DemoSizes, echo: Echo,
              progress: bool) -> str:
    """Step 5: DPO at every beta, then Preferred-FT."""
    for run in runs:
        share_reference_cache(runs)
        echo(f"      {train_run(run, paths, sizes, progress)}")
    return f"{len(runs)} models in {paths.runs}"


# ------------------------------------------------------------------ step 6: evaluation


def eval_path(run: Run) -> Path:
    return run.final / "eval.json"


def generation_eval(run: Run, paths: DemoPaths) -> dict | None:
    """The run's eval.json record against pi_sft with the demo's judge, if there is one."""
    from preftune.evaluate import read_eval_records
    from preftune.records import recorded_path

    # eval.json holds the reference as an absolute path (older demos: as it was typed).
    pi_sft = {str(paths.pi_sft), recorded_path(paths.pi_sft)}
    for record in read_eval_records(eval_path(run)):
        if (record.get("kind") == "generate" and record.get("judge") == JUDGE_SPEC
                and record.get("reference") in pi_sft):
            return record
    return None


def refresh_run_reports(runs: list[Run]) -> list[str]:
    """Rewrite each run's own report.html that is older than its eval.json, so that it shows
    its evaluation beside its curves (also when a stop came between the two); returns names."""
    from preftune.report import write_report

    refreshed = []
    for run in runs:
        report, evaluation = run.folder / "report.html", eval_path(run)
        if evaluation.is_file() and (not report.is_file()
                                     or report.stat().st_mtime_ns < evaluation.stat().st_mtime_ns):
            write_report(run.folder)
            refreshed.append(run.name)
    return refreshed


def evaluate_all(runs: list[Run], paths: DemoPaths, sizes: DemoSizes, echo: Echo) -> str:
    """Step 6: `preftune eval generate` of every model against pi_sft on held-out prompts.

    Samples at temperature 1 and top-p 1, so the KL estimate is KL(pi || pi_sft) itself. Each
    model's eval.json and samples.jsonl go into its final/ folder; the leaderboard of all of
    them into runs/.
    """
    from preftune.eval_generate import compare_models

    if all(generation_eval(r, paths) for r in runs):
        refreshed = refresh_run_reports(runs)
        return "kept the evaluations already there" + (
            f"; refreshed the report of {', '.join(refreshed)}" if refreshed else "")
    # seed + 1: evaluation samples draw from another random stream than step 3's pairs.
    result = compare_models(
        [str(r.final) for r in runs], str(paths.pi_sft), paths.heldout_prompts, JUDGE_SPEC,
        max_new_tokens=sizes.max_new_tokens, temperature=1.0, top_p=1.0, seed=sizes.seed + 1,
        batch_size=sizes.sample_batch_size, echo=lambda m: echo(f"      {m}"),
    )
    refresh_run_reports(runs)
    return f"{len(result['evals'])} models on {sizes.heldout_prompts} held-out prompts"


# ------------------------------------------------------------------ the whole demo


@dataclass
class HumanLabeling:
    """`--human`: step 4 by people in the browser (see `preftune.demo.human`)."""

    host: str = "127.0.0.1"
    port: int = 8000
    target: int = 64  # stop waiting once this many pairs carry a vote
    wait_for_enter: bool = True  # also stop when the researcher presses Enter


def run_demo(out: str | Path, sizes: DemoSizes = FULL_SIZES, echo: Echo = print,
             progress: bool = True, human: HumanLabeling | None = None,
             command: str = "preftune demo") -> dict:
    """Run (or finish) the seven steps into `out`; returns the demo summary (demo.json).

    Ctrl-C or SIGTERM raise `DemoStopped` (a KeyboardInterrupt) saying where the demo stopped;
    a training run stopped that way keeps a checkpoint, which the next call resumes.
    """
    from preftune.demo.summary import build_summary, write_summary
    from preftune.modeling import quiet_transformers

    quiet_transformers()  # the steps' own messages, not a weight-loading bar per model
    paths = DemoPaths(out)
    if check_out_folder(paths.out):
        check_pi_sft(paths, sizes)
        check_not_moved(paths)
        echo(f"Continuing the demo in {paths.out}: finished steps are kept, an interrupted one "
             "goes on where it stopped.")
    runs = planned_runs(paths, sizes.betas)
    timer = StepTimer(echo)
    start = time.perf_counter()
    summary: dict = {}
    with stops_cleanly(timer, paths.out, command):
        timer.run(1, "world", "Synthetic movie-review world: review openings as prompts, latent "
                  "sentiment reward r*", lambda: write_prompts(paths, sizes))
        timer.run(2, "pi_sft", f"Tokenizer and pi_sft from scratch -> {paths.pi_sft}",
                  lambda: train_pi_sft(paths, sizes, progress, echo))
        timer.run(3, "sample", "preftune sample: two continuations per training prompt from pi_sft",
                  lambda: sample_pairs_step(paths, sizes, progress))
        if human is None:
            timer.run(4, "label", "preftune label auto --bt-sample: r* picks through Bradley-Terry",
                      lambda: label_pairs_step(paths, sizes, progress))
        else:
            from preftune.demo.human import label_with_people

            timer.run(4, "label", "preftune label serve: you pick the better continuation",
                      lambda: label_with_people(paths.pairs, paths.labels_db, paths.dataset, human,
                                                echo, min_pairs=sizes.batch_size))
        timer.run(5, "train", f"preftune train: DPO at beta {', '.join(f'{b:g}' for b in sizes.betas)}"
                  " against pi_sft, and Preferred-FT",
                  lambda: train_all(runs, paths, sizes, echo, progress))
        timer.run(6, "eval", "preftune eval generate: every model against pi_sft on held-out prompts",
                  lambda: evaluate_all(runs, paths, sizes, echo))

        figures: list = []

        def summarize() -> str:
            built, drawn = build_summary(paths, sizes, runs, command)
            summary.update(built)
            figures.extend(drawn)
            return f"{paths.summary} and {paths.report}"

        timer.run(7, "summary", "Summary and report", summarize)
        # Written once every step is timed, so that the report's table of times is demo.json's;
        # demo.json goes last: present means the demo finished.
        summary["seconds"] = dict(timer.seconds, total=round(time.perf_counter() - start, 2))
        write_summary(paths, summary, figures)
    return summary
