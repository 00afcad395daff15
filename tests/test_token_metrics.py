"""Per-token statistics of the logits (token_stats.py) and the metrics built on them
(train.token_metrics: TRL's `entropy`, `mean_token_accuracy`, `logits/chosen`, `logits/rejected`).

Every layout and log-prob path of tests/test_ld_wpo.py is held to `direct`, the statistics worked
out here from the full (2B, T, V) logits of a padded batch with TRL's completion masks.
"""

import pytest
import torch
from test_ld_wpo import PAIRS, PATHS, _model

from preftune.data.collate import collate_pairs
from preftune.data.tokenize import TokenizedPair
from preftune.token_stats import TOKEN_METRIC_STATS, WPO


def _greedy(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def pairs_the_model_partly_predicts(model):
    """PAIRS with the first two tokens of each chosen response replaced by the model's own greedy
    choices: top1 then counts some chosen tokens and misses the others (the tiny model's top
    choice is none of PAIRS' tokens)."""
    pairs = []
    for p in PAIRS:
        start = _greedy(model, p.prompt_ids, min(2, len(p.chosen_ids)))
        pairs.append(TokenizedPair(p.prompt_ids, start + p.chosen_ids[len(start):], p.rejected_ids, index=p.index))
    return pairs


def direct(model, pairs):
    """{statistic: per-sequence sum over completion tokens (2B,)} from the full logits."""
    batch = collate_pairs(pairs, pad_token_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
    mask = batch.completion_mask[:, 1:].float()  # (2B, T-1): positions predicting a completion token
    log_p = logits.log_softmax(-1)  # (2B, T-1, V)
    per_token = {
        "entropy": -(log_p.exp() * log_p).sum(-1),
        "mean_logit": logits.sum(-1) / logits.shape[-1],
        "top1": (logits.argmax(-1) == batch.input_ids[:, 1:]).float(),
    }
    return {name: (value * mask).sum(1) for name, value in per_token.items()}


@pytest.mark.parametrize("with_wpo_and_ld", [False, True], ids=["alone", "with wpo and ld"])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_gives_the_statistics_of_the_full_logits(path, with_wpo_and_ld):
    layout, options, chunk = PATHS[path]
    model = _model(**options)
    pairs = pairs_the_model_partly_predicts(model)
    expected = direct(model, pairs)
    assert expected["top1"][:3].sum() >= 3 and expected["top1"][3:].sum() == 0  # chosen tokens hit, not all
    stats = (WPO, *TOKEN_METRIC_STATS) if with_wpo_and_ld else TOKEN_METRIC_STATS
    ld = 0.3 if with_wpo_and_ld else None  # LD-DPO discounts the log-probs, never the statistics
    sums, counts, got = layout(model, ld, stats, chunk, pairs)
    assert set(got) == set(stats)
    for name in TOKEN_METRIC_STATS:
        assert not got[name].requires_grad
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)
    assert sums.requires_grad  # the log-probs still train
