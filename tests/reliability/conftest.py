"""Fixtures for the reliability tests: one tiny model per session, built offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from reliability_helpers import PAIRS, write_pairs


@pytest.fixture(scope="session")
def dropout_model(tmp_path_factory):
    """A tiny GPT-2 (its configs keep dropout at 0.1), so a resume must restore the RNG."""
    from preftune.demo.tiny import save_tiny_model

    texts = [row["prompt"] + row["chosen"] + row["rejected"] for row in PAIRS]
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", texts=texts)


@pytest.fixture
def pairs_path(tmp_path):
    return write_pairs(tmp_path / "pairs.jsonl")


@pytest.fixture
def single_thread():
    """In-process runs compared with single-threaded subprocesses must use one thread too; the
    deterministic flag a run sets is process-wide, so it is put back afterwards."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
