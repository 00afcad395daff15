"""Fixtures for the reliability tests: one tiny model, one data file and one uninterrupted
reference run per session, built offline."""

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from preftune_test_data import torch_threads
from reliability_helpers import PAIRS, run_config, train_in_process, weights, write_pairs


@contextlib.contextmanager
def one_thread():
    """Runs compared with single-threaded subprocesses must use one thread too (thread count
    can change float sums); the deterministic flag a run sets is process-wide, so it is put back."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with torch_threads(1):
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def dropout_model(tmp_path_factory):
    """A tiny GPT-2 (its configs keep dropout at 0.1), so a resume must restore the RNG."""
    from preftune.demo.tiny import save_tiny_model

    texts = [row["prompt"] + row["chosen"] + row["rejected"] for row in PAIRS]
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", texts=texts)


@pytest.fixture(scope="session")
def pairs_path(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl")


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, dropout_model, pairs_path):
    """Final weights of the standard run (reliability_helpers.run_config), never stopped and
    never checkpointed: what every interrupted and resumed run must reproduce bit for bit."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    raw = run_config(dropout_model, pairs_path, output_dir, train={"save_every": None})
    with one_thread():
        return weights(train_in_process(raw))
