"""Shared fixtures: tests run offline, on tiny models built in-process."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see src/preftune/__init__.py

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

from preftune_test_data import PAIRS, torch_threads, write_jsonl  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP threads that wait
    for each other make a 10 s test take minutes; restore the setting for other tests."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """tiny_model_factory(arch, **kwargs) -> folder with a saved random model and tokenizer."""
    from preftune.demo.tiny import save_tiny_model

    made = {}

    def make(arch="llama", **kwargs):
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            made[key] = save_tiny_model(folder, arch, **kwargs)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture
def pairs_file(tmp_path):
    rows = [dict(r) for r in PAIRS for _ in range(4)]  # 16 pairs
    return write_jsonl(tmp_path / "pairs.jsonl", rows)
