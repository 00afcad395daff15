"""Bradley-Terry: hand-worked numbers, recovery of known ratings, interval coverage."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from preftune.bradley_terry import (
    ELO_SCALE,
    Outcome,
    fit_ratings,
    mean_with_se,
    probability,
    win_rate,
)
from preftune.errors import UserError

# A prior this weak leaves the maximum-likelihood estimate unchanged to ~1e-8 points when no
# system is undefeated, so fits can be compared with closed forms.
NO_PRIOR = 1e-9


def test_probability_matches_the_seed_example():
    # exp(2) / (exp(2) + exp(1)) = 7.389 / (7.389 + 2.718) = 0.731
    assert probability(2.0, 1.0) == pytest.approx(math.exp(2) / (math.exp(2) + math.exp(1)))
    assert round(probability(2.0, 1.0), 3) == 0.731


def test_probability_on_arrays_and_tensors_without_overflow():
    p = probability(np.array([2.0, 1000.0, -1000.0]), np.array([1.0, 0.0, 0.0]))
    assert isinstance(p, np.ndarray)
    np.testing.assert_allclose(p, [0.7310585786, 1.0, 0.0], atol=1e-9)

    r1 = torch.tensor([2.0, 800.0], requires_grad=True)
    p = probability(r1, torch.tensor([1.0, -800.0]))
    assert isinstance(p, torch.Tensor) and torch.isfinite(p).all()
    p[0].backward()
    # d sigmoid(d) / d d = p (1 - p) = 0.731 * 0.269
    assert r1.grad[0].item() == pytest.approx(0.7310586 * (1 - 0.7310586), rel=1e-5)


@given(st.floats(-50, 50), st.floats(-50, 50))
def test_probability_is_complementary_and_shift_invariant(a, b):
    assert probability(a, b) + probability(b, a) == pytest.approx(1.0)
    assert probability(a + 3.0, b + 3.0) == pytest.approx(probability(a, b), abs=1e-12)


def test_two_systems_rating_gap_is_the_log_odds():
    # A won 7 of 10: the MLE sets sigmoid(rA - rB) = 0.7, so rA - rB = ln(7/3) natural units,
    # and 400 / ln 10 * ln(7/3) = 147.2 points.
    outcomes = [("A", "B")] * 7 + [("B", "A")] * 3
    board = fit_ratings(outcomes, anchor="B", prior_strength=NO_PRIOR, n_bootstrap=0)
    assert board["B"].rating == 1000.0
    assert board["A"].rating - 1000.0 == pytest.approx(ELO_SCALE * math.log(7 / 3), abs=1e-4)
    assert board["A"].rating - 1000.0 == pytest.approx(147.2, abs=0.05)
    assert board.win_probability("A", "B") == pytest.approx(0.7, abs=1e-9)


def test_ties_count_as_half_a_win():
    # 6 wins, 2 losses, 2 ties score 7 : 3 for A, the same as the 7-3 case above.
    outcomes = (
        [Outcome("A", "B")] * 6 + [{"winner": "B", "loser": "A"}] * 2 + [("B", "A", True)] * 2
    )
    board = fit_ratings(outcomes, anchor="B", prior_strength=NO_PRIOR, n_bootstrap=0)
    assert board["A"].rating - 1000.0 == pytest.approx(ELO_SCALE * math.log(7 / 3), abs=1e-4)
    assert (board["A"].wins, board["A"].losses, board["A"].ties) == (6, 2, 2)


def test_three_systems_consistent_counts_give_exact_gaps():
    # Counts proportional to BT probabilities with rA - rB = rB - rC = ln 2 (A-B 2:1, B-C 2:1,
    # A-C 4:1) meet the likelihood equations "score = expected score" exactly, so those are
    # the MLE: B = C + ln 2 * 173.7 = 1120.4, A = C + ln 4 * 173.7 = 1240.8.
    outcomes = (
        [("A", "B")] * 2 + [("B", "A")] + [("B", "C")] * 2 + [("C", "B")]
        + [("A", "C")] * 4 + [("C", "A")]
    )
    board = fit_ratings(outcomes, anchor="C", prior_strength=NO_PRIOR, n_bootstrap=0)
    assert [r.system for r in board.ratings] == ["A", "B", "C"]
    assert board["B"].rating == pytest.approx(1000 + ELO_SCALE * math.log(2), abs=1e-4)
    assert board["A"].rating == pytest.approx(1000 + ELO_SCALE * math.log(4), abs=1e-4)


def test_prior_keeps_an_undefeated_system_finite_and_ordered():
    board = fit_ratings([("A", "B")] * 10 + [("B", "C")] * 6 + [("C", "B")] * 4, anchor="C",
                        n_bootstrap=50)
    assert all(math.isfinite(r.rating) for r in board.ratings)
    assert board["A"].rating > board["B"].rating > board["C"].rating
    # B beat C 6-4 and the default prior barely moves that: ln(1.5) natural units = 70.4 points.
    assert board["B"].rating - 1000 == pytest.approx(ELO_SCALE * math.log(1.5), abs=3.0)


def simulate(rng, true_points, n_per_pair):
    """Pairwise outcomes drawn from Bradley-Terry with the given ratings (points)."""
    theta = np.asarray(true_points) / ELO_SCALE
    outcomes = []
    for i in range(len(theta)):
        for j in range(i + 1, len(theta)):
            wins_i = rng.binomial(n_per_pair, probability(theta[i], theta[j]))
            outcomes += [(i, j)] * wins_i + [(j, i)] * (n_per_pair - wins_i)
    return outcomes


def test_recovers_known_ratings_from_simulated_outcomes():
    true = np.array([1000.0, 1100.0, 900.0, 1250.0])
    outcomes = simulate(np.random.default_rng(1), true, n_per_pair=1500)
    board = fit_ratings(outcomes, systems=[0, 1, 2, 3], anchor=0, n_bootstrap=300, seed=3)
    for system, truth in enumerate(true):
        row = board[system]
        # 1500 games per pair: the standard error of a gap is about 10 points.
        assert row.rating == pytest.approx(truth, abs=35.0)
        assert row.lower <= truth <= row.upper
        assert row.upper - row.lower < 80.0


def test_bootstrap_intervals_cover_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(2024)
    true = np.array([1000.0, 1080.0, 940.0])
    hits, checks = 0, 0
    for repeat in range(200):
        outcomes = simulate(rng, true, n_per_pair=60)
        board = fit_ratings(outcomes, systems=[0, 1, 2], anchor=0, n_bootstrap=200, seed=repeat)
        for system in (1, 2):  # the anchor's interval is a point by construction
            hits += board[system].lower <= true[system] <= board[system].upper
            checks += 1
    coverage = hits / checks
    print(f"\nbootstrap 95% interval coverage: {coverage:.4f} over {checks} checks")
    assert 0.88 <= coverage <= 0.99, coverage


def test_bootstrap_is_seeded():
    outcomes = simulate(np.random.default_rng(0), [1000.0, 1050.0], n_per_pair=40)
    a = fit_ratings(outcomes, n_bootstrap=100, seed=7)
    b = fit_ratings(outcomes, n_bootstrap=100, seed=7)
    c = fit_ratings(outcomes, n_bootstrap=100, seed=8)
    assert a.to_dict() == b.to_dict()
    assert a.to_dict() != c.to_dict()


def test_leaderboard_renders_best_first():
    outcomes = [("dpo", "sft")] * 8 + [("sft", "dpo")] * 2 + [("dpo", "ft")] * 6 + [("ft", "dpo")] * 4
    board = fit_ratings(outcomes, anchor="sft", n_bootstrap=100)
    markdown = board.to_markdown().splitlines()
    assert markdown[0].startswith("| rank | system | rating | 95% CI |")
    assert markdown[2].startswith("| 1 | dpo |")
    assert "| sft | 1000 | 1000 to 1000 |" in board.to_markdown()
    text = str(board)
    assert text.index("dpo") < text.index("sft")
    json.dumps(board.to_dict())  # eval.json must be able to hold it


@pytest.mark.parametrize(
    "outcomes, message",
    [
        ([("A", "B"), ("C", "D")], "never compared"),
        ([("A", "A")], "compared with itself"),
        ([("A",)], "expected (winner, loser"),
        ([{"win": "A"}], "'winner' and 'loser'"),
        ([("A", "B")] * 0, "at least two systems"),
    ],
)
def test_bad_outcomes_are_user_errors(outcomes, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        fit_ratings(outcomes, n_bootstrap=0)


def test_unknown_anchor_is_a_user_error():
    with pytest.raises(UserError, match="anchor 'Z'"):
        fit_ratings([("A", "B"), ("B", "A")], anchor="Z")


def test_wilson_interval_by_hand():
    # p = 0.8, n = 10, z = 1.96: centre = (0.8 + z^2/20) / (1 + z^2/10) = 0.7167,
    # half width = z / 1.3841 * sqrt(0.016 + z^2/400) = 0.2266 -> [0.4902, 0.9433].
    rate, lower, upper = win_rate(8, 0, 10)
    assert rate == 0.8
    assert (lower, upper) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    # Ties count as half: 6 wins and 4 ties score the same 0.8.
    assert win_rate(6, 4, 10) == win_rate(8, 0, 10)
    # Unlike the normal interval, Wilson's stays inside [0, 1] with non-zero width at 10 of 10.
    _, lower, upper = win_rate(10, 0, 10)
    assert 0.65 < lower < 0.75 and upper == 1.0


@pytest.mark.parametrize("n", [10, 256, 1000])
def test_wilson_bounds_at_zero_and_all_wins_are_exact(n):
    # Rounding left 1 - 1e-16 at 256 of 256 and 3e-17 at 0 of 10, which print as 1.000 / 0.000
    # but fail an equality a reader of eval.json would rightly expect to hold.
    assert win_rate(n, 0, n).upper == 1.0 and win_rate(0, 0, n).lower == 0.0
    assert win_rate(n, 0, n).lower == pytest.approx(n / (n + 1.959963984540054**2))


def test_win_rate_rejects_impossible_counts():
    with pytest.raises(ValueError):
        win_rate(0, 0, 0)
    with pytest.raises(ValueError):
        win_rate(8, 3, 10)


def test_mean_with_se():
    # sd of 1, 2, 3, 4 (n - 1) = sqrt(5/3) = 1.291; se = 1.291 / 2 = 0.6455.
    mean, se, n = mean_with_se([1.0, 2.0, 3.0, 4.0])
    assert (mean, n) == (2.5, 4)
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert mean_with_se(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx((2.5, se, 4))
    assert math.isnan(mean_with_se([3.0]).se)
    with pytest.raises(ValueError):
        mean_with_se([])


@pytest.mark.parametrize(
    "outcomes, open_systems",
    [
        # Undefeated (or winless) against the anchor: every resample is as one-sided as the data,
        # so a percentile interval would collapse onto the prior-driven point.
        ([("A", "ref")] * 16, {"A"}),
        ([("ref", "A")] * 16, {"A"}),
        # B never won against ref's side, A never lost to it: both unbounded.
        ([("A", "ref")] * 5 + [("ref", "B")] * 5 + [("A", "B")] * 3, {"A", "B"}),
        # A beat ref every time but lost to B, which lost to ref: bounded both ways.
        ([("A", "ref")] * 16 + [("B", "ref")] * 9 + [("ref", "B")] * 7 + [("B", "A")], set()),
        # A tie gives a point to each side, so it bounds the gap.
        ([("A", "ref")] * 16 + [("ref", "A", True)], set()),
    ],
)
def test_ratings_the_data_leave_unbounded_get_open_intervals(outcomes, open_systems):
    board = fit_ratings(outcomes, anchor="ref", n_bootstrap=100)
    for row in board.ratings:
        if row.system in open_systems:
            assert (row.lower, row.upper) == (-math.inf, math.inf), row
        else:
            assert math.isfinite(row.lower) and math.isfinite(row.upper), row
    as_json = json.loads(json.dumps(board.to_dict(), allow_nan=False))  # strict JSON
    for row in as_json["ratings"]:
        assert (row["ci"] == [None, None]) == (row["system"] in open_systems)
    assert ("unbounded" in board.to_markdown()) == bool(open_systems)


def test_no_bootstrap_resamples_give_no_interval_not_a_zero_width_one():
    """--n-bootstrap 0 printed every rating's interval as 'R to R', certainty the data do not give."""
    board = fit_ratings([("A", "B")] * 7 + [("B", "A")] * 3, anchor="B", n_bootstrap=0)
    assert all(math.isnan(r.lower) and math.isnan(r.upper) for r in board.ratings)
    text = board.to_text()
    assert " to " not in text.split("Bradley-Terry")[0] and "no intervals (0 bootstrap resamples)." in text
    as_json = json.loads(json.dumps(board.to_dict(), allow_nan=False))  # strict JSON
    assert [row["ci"] for row in as_json["ratings"]] == [[None, None]] * 2 and as_json["n_bootstrap"] == 0


def test_bootstrap_resamples_whole_groups_when_comparisons_are_not_independent():
    # Each prompt's outcome copied four times (four annotators who always agree, say) is one
    # prompt's worth of evidence: resampling the prompts gives the single copy's interval, while
    # resampling comparisons one by one would halve it.
    once = simulate(np.random.default_rng(4), [1000.0, 1100.0], n_per_pair=60)
    copies = [o for o in once for _ in range(4)]
    prompts = [n for n in range(len(once)) for _ in range(4)]

    def width(outcomes, groups=None):
        row = fit_ratings(outcomes, systems=[0, 1], anchor=0, n_bootstrap=400, seed=1,
                          groups=groups)[1]
        return row.upper - row.lower

    single = width(once)
    assert width(copies, prompts) == pytest.approx(single, rel=0.15)
    assert width(copies) < 0.7 * single
    board = fit_ratings(copies, n_bootstrap=10, groups=prompts)
    assert board.to_dict()["resampled"] == "groups of comparisons (prompts)"
    assert "resamples of the groups of comparisons (prompts)" in board.to_text()
    with pytest.raises(ValueError, match="groups"):
        fit_ratings(copies, groups=prompts[1:])
    with pytest.raises(UserError, match="no comparisons"):
        fit_ratings([], systems=["A", "B"])
