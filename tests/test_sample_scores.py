"""The token-wise KL of `eval generate` (preftune.sample_scores) on tiny models with tiny vocabularies."""

import itertools

import pytest
import torch

import preftune.sample_scores as sample_scores
from preftune.demo.tiny import build_model
from preftune.sample_scores import score_samples

VOCAB = 8
EOS = 2
PROMPT = [1, 3, 5]


def tiny_lm(seed: int):
    """A random 8-token model whose head is scaled up, so that its next-token distributions are
    far from uniform and two seeds' KL is far from 0."""
    model = build_model("llama", vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model.eval()


@pytest.fixture(scope="module")
def policy():
    return tiny_lm(1)


@pytest.fixture(scope="module")
def reference():
    return tiny_lm(0)


def sampler_outcomes() -> list[list[int]]:
    """Every response a sampler stopping at EOS can write in 2 new tokens: [EOS] or [a, b], a != EOS."""
    return [[EOS]] + [[a, b] for a, b in itertools.product(range(VOCAB), repeat=2) if a != EOS]


@torch.no_grad()
def sequence_logps(model, responses) -> torch.Tensor:
    """log p(y|x) of each response from the model's full logits, in float64, no chunks."""
    out = []
    for y in responses:
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([PROMPT + y])).logits[0].double(), -1)
        out.append(sum(float(logprobs[len(PROMPT) - 1 + t, token]) for t, token in enumerate(y)))
    return torch.tensor(out, dtype=torch.float64)


def test_mean_of_token_wise_kl_under_the_policy_is_the_exact_sequence_kl(policy, reference):
    responses = sampler_outcomes()
    policy_logps, reference_logps = sequence_logps(policy, responses), sequence_logps(reference, responses)
    probs = policy_logps.exp()  # (S,) the sampler's distribution over whole responses
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-9)
    sequence_kl = float((probs * (policy_logps - reference_logps)).sum())  # KL(pi || ref), exactly
    assert sequence_kl > 0.05  # far enough from 0 for the comparison to mean something

    scores = score_samples(policy, reference, [PROMPT] * len(responses), responses, pad_token_id=0,
                           batch_size=16, chunk_size=5)
    kl_tokens = torch.tensor(scores.kl_tokens, dtype=torch.float64)  # (S,)
    assert float((probs * kl_tokens).sum()) == pytest.approx(sequence_kl, rel=1e-5)
    assert min(scores.kl_tokens) >= 0.0
    assert float((policy_logps - reference_logps).min()) < 0.0  # what a single row of `kl` can do
    # The log-probs come from the same pass: the Monte Carlo `kl` has the same mean.
    assert scores.policy_logps == pytest.approx(policy_logps.tolist(), abs=1e-5)
    assert scores.reference_logps == pytest.approx(reference_logps.tolist(), abs=1e-5)


def test_policy_equal_to_reference_gives_zero_for_every_response(reference):
    responses = sampler_outcomes()
    scores = score_samples(reference, reference, [PROMPT] * len(responses), responses, pad_token_id=0)
    assert scores.kl_tokens == [0.0] * len(responses)


def test_chunk_size_and_the_full_logits_path_give_the_same_numbers(policy, reference, monkeypatch):
    """A model whose logits are not its head's output gives its own logits; chunks of 1 position
    or of all of them change nothing."""
    responses = sampler_outcomes()[:20]
    prompts = [PROMPT[:1 + i % 3] for i in range(len(responses))]  # rows padded to different widths
    chunked = score_samples(policy, reference, prompts, responses, pad_token_id=0, batch_size=7, chunk_size=1)
    whole = score_samples(policy, reference, prompts, responses, pad_token_id=0, chunk_size=1024)
    monkeypatch.setattr(sample_scores, "supports_hidden_state_path", lambda model: False)
    full_logits = score_samples(policy, reference, prompts, responses, pad_token_id=0, batch_size=3)
    for other in (whole, full_logits):
        assert other.kl_tokens == pytest.approx(chunked.kl_tokens, rel=1e-5, abs=1e-6)
        assert other.policy_logps == pytest.approx(chunked.policy_logps, abs=1e-5)
        assert other.reference_logps == pytest.approx(chunked.reference_logps, abs=1e-5)


@pytest.mark.parametrize("wider", ["reference", "policy"])
def test_heads_of_different_sizes_give_the_log_probs_and_no_token_wise_kl(policy, reference, wider):
    """One tokenizer, output layers of different sizes (Qwen2.5-7B scores 152,064 token ids, 0.5B
    151,936): each model's log-probs, and so `kl`, are what they were before the token-wise KL
    existed; the two next-token distributions range over different ids, so there is no token-wise
    KL to give (None), and no size mismatch stops the evaluation."""
    wide = build_model("llama", vocab_size=VOCAB + 4, hidden_size=16, num_layers=1, num_heads=2, seed=0).eval()
    models = {"policy": policy, "reference": reference, wider: wide}
    responses = sampler_outcomes()[:10]
    scores = score_samples(models["policy"], models["reference"], [PROMPT] * len(responses), responses,
                           pad_token_id=0, chunk_size=3)
    assert scores.kl_tokens == [None] * len(responses)
    assert scores.policy_logps == pytest.approx(sequence_logps(models["policy"], responses).tolist(), abs=1e-5)
    assert scores.reference_logps == pytest.approx(sequence_logps(models["reference"], responses).tolist(), abs=1e-5)
