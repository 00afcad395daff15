"""Data shared by the top-level tests (a plain module: conftest.py names clash across folders)."""

import contextlib
import json
from pathlib import Path

PAIRS = [
    {"prompt": "Question: What is the best ice cream?\nAnswer:", "chosen": " Haagen-Dazs is rich.",
     "rejected": " GB"},
    {"prompt": "Question: Name a fast animal.\nAnswer:", "chosen": " The cheetah.", "rejected": " A snail, I think."},
    {"prompt": "Question: What is two plus two?\nAnswer:", "chosen": " Four.", "rejected": " Seven."},
    {"prompt": "Question: What color is the sky?\nAnswer:", "chosen": " Blue on a clear day.",
     "rejected": " Purple, probably."},
]


@contextlib.contextmanager
def torch_threads(n: int):
    """Torch on `n` threads for the block, the process setting restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


SEVERAL_CONFIGS = """---
configs:
- config_name: en
  data_files:
  - split: train
    path: en/train.jsonl
  - split: test
    path: en/test.jsonl
- config_name: de
  data_files:
  - split: train
    path: de/*.jsonl
---
"""


def write_multi_config_folder(folder: Path) -> Path:
    """A hub repo laid out with two configs declared in its README.md: en (train, test), de (train)."""
    for name, rows in (("en/train.jsonl", PAIRS[:2]), ("en/test.jsonl", PAIRS[2:3]), ("de/train.jsonl", PAIRS[3:])):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(folder / name, rows)
    (folder / "README.md").write_text(SEVERAL_CONFIGS)
    return folder


def make_config(tmp_path, model_path, data_path, out="run", **sections):
    """A small, fast training config; `sections` update its sections key by key."""
    from preftune.config import validate_config

    raw = {
        "model": {"path": str(model_path)},
        "data": {"train": str(data_path), "max_length": 64},
        "loss": {"type": "sigmoid", "beta": 0.1},
        "optim": {"lr": 1e-3},
        "train": {"batch_size": 4, "grad_accum": 1, "max_steps": 2, "output_dir": str(tmp_path / out),
                  "report": False, "progress": False, "seed": 0},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return validate_config(raw)


def read_metrics(run_dir, key="loss"):
    """The metrics.jsonl lines of a run that carry `key` (train lines by default)."""
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if key in m]


def hub_revision(cache: Path, repo_id: str, model: Path, commit: str) -> None:
    """`model`'s files where the hub cache keeps revision `commit` of `repo_id`, now its main."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def online_wandb_without_credentials(monkeypatch, folder: Path) -> None:
    """W&B online with no API key anywhere wandb looks: the environment, a .netrc, its settings
    files (the global one under WANDB_CONFIG_DIR, the workspace one under the current folder,
    which becomes `folder`). pytest's captured streams are no terminal to prompt on."""
    monkeypatch.setenv("WANDB_MODE", "online")
    for variable in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NETRC", str(folder / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(folder / "wandb-config"))
    monkeypatch.chdir(folder)


def deny_reading(monkeypatch, denied) -> None:
    """Path.read_bytes raises PermissionError for the file `denied`, as it does for a file of
    another account; chmod 000 would not do, since root (whom tests may run as) reads it anyway."""
    import os

    read_bytes = Path.read_bytes

    def read_unless_denied(self):
        if os.path.abspath(self) == os.path.abspath(denied):
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_unless_denied)


def reward_model_config(tokenizer):
    """A one-layer Llama reward model's config over `tokenizer`: one score per sequence."""
    import transformers

    from preftune.demo.tiny import special_token_ids

    return transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=1, **special_token_ids(tokenizer))


def save_reward_model(folder):
    """That reward model, with the tiny tokenizer, saved in `folder`."""
    import transformers

    from preftune.demo.tiny import train_tokenizer

    tokenizer = train_tokenizer()
    transformers.LlamaForSequenceClassification(reward_model_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def count_reward_model_passes(monkeypatch) -> list[int]:
    """The batch size of each forward pass of a Llama reward model, appended as they run."""
    import transformers

    passes = []
    forward = transformers.LlamaForSequenceClassification.forward

    def counted_forward(self, input_ids=None, **kwargs):
        passes.append(input_ids.shape[0])
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(transformers.LlamaForSequenceClassification, "forward", counted_forward)
    return passes
