"""The Bradley-Terry model: preference probabilities, rating fits, intervals, win rates.

Bradley-Terry says that system (or response) i is preferred over j with probability

    p(i > j) = exp(r_i) / (exp(r_i) + exp(r_j)) = sigmoid(r_i - r_j),

so only differences of the latent rewards r matter. `probability` evaluates it; `fit_ratings`
estimates r for several systems from pairwise outcomes by maximum likelihood and puts the
result on an Elo-like scale with bootstrap intervals; `win_rate` and `mean_with_se` are the
small interval helpers the evaluator reports with.

Ties count as half a win for each side (the usual convention of chess and of LLM arenas): a tie
adds 0.5 to both systems' scores, which is the maximum-likelihood treatment when a tie is read
as "each side preferred with probability one half".
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np

from preftune.errors import UserError

# One natural unit of rating (a factor e in the odds) is 400 / ln 10 Elo points, so that a
# difference of 400 points means odds of 10 to 1, exactly as in chess.
ELO_SCALE = 400.0 / math.log(10.0)
DEFAULT_ANCHOR_RATING = 1000.0


def probability(r1: Any, r2: Any) -> Any:
    """p(1 preferred over 2) = exp(r1) / (exp(r1) + exp(r2)), without overflow.

    Works on Python floats (returns a float), numpy arrays (returns an array) and torch tensors
    (returns a tensor on the same device, differentiable). The seed's example: rewards 2 and 1
    give 0.731.
    """
    if _is_torch_tensor(r1) or _is_torch_tensor(r2):
        import torch

        return torch.sigmoid(torch.as_tensor(r1) - torch.as_tensor(r2))
    p = _sigmoid(np.asarray(r1, dtype=float) - np.asarray(r2, dtype=float))
    return float(p) if np.ndim(p) == 0 else p


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of a large positive number overflows, so each sign takes the form that only ever
    # exponentiates a non-positive number.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


# --------------------------------------------------------------------------- interval helpers


class WinRate(NamedTuple):
    """A win rate (ties as half a win) with the bounds of its confidence interval."""

    rate: float
    lower: float
    upper: float


class MeanSE(NamedTuple):
    """A sample mean, its standard error (nan for a single value) and the sample size."""

    mean: float
    se: float
    n: int


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def win_rate(wins: float, ties: float, n: int, confidence: float = 0.95) -> WinRate:
    """Win rate (wins + ties / 2) / n with a Wilson score interval.

    Wilson rather than the normal (Wald) interval because evaluations often have few prompts and
    rates near 0 or 1, where Wald's interval collapses to zero width or leaves [0, 1]. Counting
    a tie as half a win makes the score's variance smaller than the binomial one the Wilson
    formula assumes, so with ties the interval errs on the wide (safe) side.
    """
    if n <= 0:
        raise ValueError(f"a win rate needs at least one comparison, got n={n}")
    if wins < 0 or ties < 0 or wins + ties > n:
        raise ValueError(f"need 0 <= wins, ties and wins + ties <= n; got {wins}, {ties}, {n}")
    z = _z(confidence)
    p = (wins + 0.5 * ties) / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 of n (n of n) the bound is exactly 0 (1); rounding could leave 1e-17 or 1 - 1e-16.
    lower = 0.0 if p == 0.0 else max(0.0, centre - half)
    upper = 1.0 if p == 1.0 else min(1.0, centre + half)
    return WinRate(p, lower, upper)


def mean_with_se(values: Any) -> MeanSE:
    """Mean and standard error (sample sd with n - 1, over sqrt n) of floats, arrays or tensors."""
    if _is_torch_tensor(values):
        values = values.detach().cpu().double().numpy()
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        raise ValueError("mean_with_se needs at least one value")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return MeanSE(float(x.mean()), se, int(x.size))


# --------------------------------------------------------------------------- outcomes


class Outcome(NamedTuple):
    """One pairwise comparison: `winner` was preferred over `loser`, or they tied."""

    winner: Hashable
    loser: Hashable
    tie: bool = False


def _as_outcome(item: Any, index: int) -> Outcome:
    if isinstance(item, dict):
        if "winner" not in item or "loser" not in item:
            raise UserError(
                f"outcome {index}: expected keys 'winner' and 'loser' (and optionally 'tie'), "
                f"got {sorted(item)}."
            )
        return Outcome(item["winner"], item["loser"], bool(item.get("tie", False)))
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return Outcome(item[0], item[1], bool(item[2]) if len(item) == 3 else False)
    raise UserError(
        f"outcome {index}: expected (winner, loser[, tie]) or a dict with 'winner'/'loser', "
        f"got {item!r}."
    )


def _categories(outcomes: Sequence[Outcome], index: dict,
                groups: Sequence[Hashable] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Collapse outcomes into distinct (i, j, tie) kinds and how often each occurred.

    Resampling comparisons with replacement is then a multinomial draw over kinds, which costs
    the same however many comparisons there are. With `groups` (one key per outcome) the counts
    are per group, (G, kinds), so that whole groups can be resampled.
    """
    kind_of: dict[tuple[int, int, bool], int] = {}
    group_of: dict[Hashable, int] = {}
    cells: list[tuple[int, int]] = []
    for n, o in enumerate(outcomes):
        i, j = index[o.winner], index[o.loser]
        if o.tie and i > j:
            i, j = j, i  # a tie has no direction: one kind for both orders
        kind = kind_of.setdefault((i, j, o.tie), len(kind_of))
        cells.append((group_of.setdefault(groups[n] if groups is not None else 0, len(group_of)), kind))
    counts = np.zeros((len(group_of), len(kind_of)))
    np.add.at(counts, tuple(np.array(cells, dtype=int).T), 1.0)
    kinds = np.array([(i, j, int(t)) for (i, j, t) in kind_of], dtype=int)
    return kinds, counts if groups is not None else counts[0]


def _score_matrices(kinds: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per kind, the (k, k) score matrix S[i, j] (points i took from j) and games matrix."""
    n_kinds = len(kinds)
    scores = np.zeros((n_kinds, k, k))
    games = np.zeros((n_kinds, k, k))
    rows = np.arange(n_kinds)
    i, j, tie = kinds[:, 0], kinds[:, 1], kinds[:, 2].astype(bool)
    scores[rows, i, j] = np.where(tie, 0.5, 1.0)
    scores[rows, j, i] = np.where(tie, 0.5, 0.0)
    games[rows, i, j] = games[rows, j, i] = 1.0
    return scores.reshape(n_kinds, k * k), games.reshape(n_kinds, k * k)


# --------------------------------------------------------------------------- maximum likelihood


def _log_posterior(theta: np.ndarray, scores: np.ndarray, prior_strength: float) -> np.ndarray:
    """sum_ij S_ij log sigmoid(theta_i - theta_j) - prior / 2 |theta|^2, per batch row."""
    diff = theta[:, :, None] - theta[:, None, :]  # (B, k, k)
    ll = (scores * _log_sigmoid(diff)).sum(axis=(1, 2))
    return ll - 0.5 * prior_strength * (theta**2).sum(axis=1)


def _fit_natural(
    scores: np.ndarray, games: np.ndarray, prior_strength: float, max_iter: int = 200
) -> np.ndarray:
    """Maximum a posteriori ratings for a batch of data sets, by damped Newton steps.

    scores, games: (B, k, k). Returns (B, k) ratings in natural units with mean zero.

    The log-likelihood is concave, and the Gaussian prior (a ridge) makes it strictly concave, so
    Newton converges to the unique maximum; step halving guards the first steps, where a
    near-undefeated system can make a full step overshoot. The likelihood alone only fixes
    differences of ratings; the ridge also pins their mean at zero, and the anchor is applied
    afterwards.
    """
    batch, k, _ = scores.shape
    theta = np.zeros((batch, k))
    objective = _log_posterior(theta, scores, prior_strength)
    # The gradient always sums to zero (every game hands out exactly one point), so Newton
    # steps stay in the mean-zero subspace. Adding ones*ones^T / k to the Hessian makes it
    # invertible in the constant direction without changing those steps.
    flat = np.ones((k, k)) / k
    for _ in range(max_iter):
        p = _sigmoid(theta[:, :, None] - theta[:, None, :])  # (B, k, k)
        grad = (scores - games * p).sum(axis=2) - prior_strength * theta  # (B, k)
        weights = games * p * (1.0 - p)  # (B, k, k)
        # Negative Hessian: the weighted graph Laplacian of the comparisons plus the ridge.
        neg_hessian = flat - weights
        diagonal = np.arange(k)
        neg_hessian[:, diagonal, diagonal] += weights.sum(axis=2) + prior_strength
        step = np.linalg.solve(neg_hessian, grad[:, :, None])[:, :, 0]  # (B, k)
        theta, objective = _damped_update(theta, step, objective, scores, prior_strength)
        if np.abs(step).max() < 1e-10:
            break
    return theta


def _damped_update(theta, step, objective, scores, prior_strength):
    """Halve each batch row's step until the objective does not decrease."""
    size = np.ones(theta.shape[0])
    for _ in range(40):
        candidate = theta + size[:, None] * step
        cand_objective = _log_posterior(candidate, scores, prior_strength)
        ok = cand_objective >= objective - 1e-12 * np.abs(objective)
        if ok.all():
            break
        size = np.where(ok, size, size / 2.0)
    return candidate, cand_objective


def _check_connected(games: np.ndarray, systems: list) -> None:
    """Ratings compare only within a connected web of comparisons; refuse anything else."""
    k = len(systems)
    reached = np.zeros(k, dtype=bool)
    reached[0] = True
    frontier = [0]
    while frontier:
        i = frontier.pop()
        for j in np.flatnonzero((games[i] > 0) & ~reached):
            reached[j] = True
            frontier.append(int(j))
    if not reached.all():
        apart = [str(s) for s, r in zip(systems, reached) if not r]
        raise UserError(
            f"systems {', '.join(apart)} were never compared with {systems[0]}, directly or "
            "through other systems, so no rating can put them on one scale; add comparisons "
            "that link them."
        )


# --------------------------------------------------------------------------- leaderboard


@dataclass(frozen=True)
class Rating:
    """One system's row of a leaderboard; `rating`, `lower`, `upper` are on the Elo-like scale."""

    system: Hashable
    rating: float
    lower: float
    upper: float
    wins: int
    losses: int
    ties: int

    @property
    def games(self) -> int:
        return self.wins + self.losses + self.ties


@dataclass(frozen=True)
class Leaderboard:
    """Bradley-Terry ratings of several systems, best first.

    Ratings are `anchor_rating + scale * (r - r_anchor)`, with r in natural units (log-odds), so
    the anchor sits exactly at `anchor_rating` and its interval has zero width: every interval is
    the uncertainty of a system *relative to the anchor*. An interval of (-inf, inf) (null in
    `to_dict`) marks a rating the data leave unbounded, fitted finite by the prior alone; NaN
    (null too; n_bootstrap says which) an interval not computed, with no bootstrap resamples.
    """

    ratings: list[Rating]
    anchor: Hashable
    anchor_rating: float
    scale: float
    confidence: float
    n_comparisons: int
    n_bootstrap: int
    prior_strength: float
    resampled: str = "comparisons"  # what the bootstrap resamples (see fit_ratings' groups)

    def __getitem__(self, system: Hashable) -> Rating:
        for row in self.ratings:
            if row.system == system:
                return row
        raise KeyError(system)

    def win_probability(self, a: Hashable, b: Hashable) -> float:
        """Bradley-Terry probability that `a` is preferred over `b`, from the fitted ratings."""
        return probability(self[a].rating / self.scale, self[b].rating / self.scale)

    def to_dict(self) -> dict:
        """JSON-ready form (for eval.json): the settings and one dict per system."""
        return {
            "anchor": str(self.anchor),
            "anchor_rating": self.anchor_rating,
            "scale": self.scale,
            "confidence": self.confidence,
            "n_comparisons": self.n_comparisons,
            "n_bootstrap": self.n_bootstrap,
            "prior_strength": self.prior_strength,
            "resampled": self.resampled,
            "ratings": [
                {"system": str(r.system), "rating": r.rating,
                 "ci": [_finite_or_none(r.lower), _finite_or_none(r.upper)],
                 "wins": r.wins, "losses": r.losses, "ties": r.ties}
                for r in self.ratings
            ],
        }

    def _rows(self) -> tuple[list[str], list[list[str]]]:
        pct = f"{round(self.confidence * 100)}% CI"
        header = ["rank", "system", "rating", pct, "wins", "losses", "ties", "games"]
        rows = [
            [str(rank), str(r.system), f"{r.rating:.0f}", _interval_text(r),
             str(r.wins), str(r.losses), str(r.ties), str(r.games)]
            for rank, r in enumerate(self.ratings, start=1)
        ]
        return header, rows

    def to_markdown(self) -> str:
        header, rows = self._rows()
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines) + "\n\n" + self._footnote()

    def to_text(self) -> str:
        header, rows = self._rows()
        widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
        # Names left-aligned, numbers right-aligned, as a reader scans them.
        def fmt(row: list[str]) -> str:
            return "  ".join(
                cell.ljust(w) if c == 1 else cell.rjust(w)
                for c, (cell, w) in enumerate(zip(row, widths))
            )
        lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
        return "\n".join(lines) + "\n" + self._footnote()

    def _footnote(self) -> str:
        text = (
            f"Bradley-Terry ratings from {self.n_comparisons} comparisons (ties count half); "
            f"{self.anchor} fixed at {self.anchor_rating:.0f}; 400 points = 10:1 odds; "
            + (f"intervals from {self.n_bootstrap} bootstrap resamples of the {self.resampled}."
               if self.n_bootstrap else "no intervals (0 bootstrap resamples).")
        )
        if any(math.isinf(r.lower) or math.isinf(r.upper) for r in self.ratings):
            text += (" 'unbounded': the system never lost (or never won) against the rest, so "
                     "the data put no bound on its rating and the prior alone keeps it finite.")
        return text

    def __str__(self) -> str:
        return self.to_text()


def _finite_or_none(x: float) -> float | None:
    """JSON has no infinity: an unbounded side of an interval is written as null."""
    return float(x) if math.isfinite(x) else None


def _interval_text(r: Rating) -> str:
    if math.isinf(r.lower) or math.isinf(r.upper):
        return "unbounded"
    if math.isnan(r.lower) or math.isnan(r.upper):
        return "–"  # not computed (no bootstrap resamples)
    return f"{r.lower:.0f} to {r.upper:.0f}"


def fit_ratings(
    outcomes: Iterable[Any],
    systems: Sequence[Hashable] | None = None,
    anchor: Hashable | None = None,
    anchor_rating: float = DEFAULT_ANCHOR_RATING,
    scale: float = ELO_SCALE,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    prior_strength: float = 0.01,
    groups: Sequence[Hashable] | None = None,
) -> Leaderboard:
    """Fit Bradley-Terry ratings to pairwise outcomes; return a leaderboard with intervals.

    outcomes: `Outcome`s, `(winner, loser)` / `(winner, loser, tie)` tuples, or dicts with keys
        `winner`, `loser` and optionally `tie`. In a tie, the order of the two does not matter.
    systems: every system to rate, in a fixed order (default: order of first appearance).
    anchor: the system held at `anchor_rating` (default: the first system), e.g. the reference.
    scale: points per natural unit of rating; the default 400 / ln 10 is the Elo convention.
    n_bootstrap: resamples of the comparisons (with replacement, seeded by `seed`) behind the
        percentile intervals; 0 skips them, leaving no interval (NaN bounds: null in
        `to_dict`, "–" in the tables), not a zero-width one at the point. Either way a
        rating the data leave unbounded (its system never lost, or never won, against the
        anchor's side of the comparisons) gets the interval (-inf, inf).
    prior_strength: a Gaussian prior N(0, 1 / prior_strength) on each rating in natural units,
        i.e. a ridge on the log-likelihood. Without it a system that never lost would get an
        infinite rating; the default 0.01 (standard deviation 10 natural units, about 1700
        points) moves ratings by well under a point once each pair has a few dozen comparisons.
    groups: one key per outcome naming the unit the bootstrap resamples, e.g. the prompt when
        every system answered every prompt: comparisons on one prompt share responses (and a
        judge's view of that prompt), so they are not independent, and resampling them one by
        one gives intervals too narrow. Default: each comparison is its own unit.
    """
    if prior_strength <= 0:
        raise ValueError("prior_strength must be positive: it keeps undefeated systems finite")
    outcomes = [_as_outcome(item, n) for n, item in enumerate(outcomes)]
    systems = _system_list(outcomes, systems)
    if not outcomes:
        raise UserError(f"there are no comparisons between {systems} to fit ratings to.")
    anchor = systems[0] if anchor is None else anchor
    if anchor not in systems:
        raise UserError(f"anchor {anchor!r} is not among the rated systems {systems}.")
    index = {s: n for n, s in enumerate(systems)}
    k = len(systems)
    if groups is not None:
        groups = list(groups)
        if len(groups) != len(outcomes):
            raise ValueError(f"groups has {len(groups)} keys for {len(outcomes)} outcomes")
    kinds, group_counts = _categories(outcomes, index, groups)
    counts = group_counts.sum(axis=0) if groups is not None else group_counts
    kind_scores, kind_games = _score_matrices(kinds, k)
    games = (counts @ kind_games).reshape(k, k)
    _check_connected(games, systems)

    def to_points(theta: np.ndarray) -> np.ndarray:  # (B, k) natural units -> (B, k) points
        return anchor_rating + scale * (theta - theta[:, [index[anchor]]])

    scores = (counts @ kind_scores).reshape(1, k, k)
    point = to_points(_fit_natural(scores, games[None], prior_strength))[0]
    # No resamples, no interval: NaN (null in to_dict, "–" in the tables), not a zero-width
    # interval at the point, which would read as certainty.
    lower, upper = np.full_like(point, math.nan), np.full_like(point, math.nan)
    if n_bootstrap > 0:
        draws = _bootstrap(group_counts, kind_scores, kind_games, k, n_bootstrap, seed,
                           prior_strength)
        tail = (1.0 - confidence) / 2.0 * 100.0
        lower, upper = np.percentile(to_points(draws), [tail, 100.0 - tail], axis=0)
    # Where the data leave a rating unbounded (a system that never lost, or never won, against
    # the anchor's side), every resample is as one-sided as the data: the bootstrap's interval
    # collapses onto the prior-driven point, which would claim a certainty the data lack.
    open_ended = ~_bounded_by_data(scores[0], index[anchor])
    lower[open_ended], upper[open_ended] = -math.inf, math.inf
    rows = [
        Rating(s, float(point[n]), float(lower[n]), float(upper[n]), *_record(outcomes, s))
        for n, s in enumerate(systems)
    ]
    rows.sort(key=lambda r: -r.rating)
    return Leaderboard(rows, anchor, anchor_rating, scale, confidence, len(outcomes),
                       n_bootstrap, prior_strength,
                       "comparisons" if groups is None else "groups of comparisons (prompts)")


def _system_list(outcomes: list[Outcome], systems: Sequence[Hashable] | None) -> list:
    seen = list(dict.fromkeys(s for o in outcomes for s in (o.winner, o.loser)))
    for n, o in enumerate(outcomes):
        if o.winner == o.loser:
            raise UserError(f"outcome {n}: {o.winner!r} is compared with itself.")
    if systems is None:
        systems = seen
    else:
        systems = list(systems)
        unknown = [s for s in seen if s not in systems]
        if unknown:
            raise UserError(f"outcomes name systems {unknown} that are not in systems={systems}.")
    if len(systems) < 2:
        raise UserError(f"ratings need comparisons between at least two systems, got {systems}.")
    return systems


def _bounded_by_data(scores: np.ndarray, anchor: int) -> np.ndarray:
    """Per system, whether the likelihood bounds its rating relative to the anchor on both sides.

    scores: (k, k) points S[i, j] that i took from j. A point i took from j bounds r_j - r_i from
    above, and bounds chain along paths, so r_s - r_anchor is bounded below when s reaches the
    anchor through such points and above when the anchor reaches s. Otherwise the maximum
    likelihood estimate is infinite and only the prior keeps the fitted rating finite.
    """
    k = scores.shape[0]
    reach = (scores > 0) | np.eye(k, dtype=bool)
    for via in range(k):  # transitive closure (Warshall)
        reach |= reach[:, [via]] & reach[[via], :]
    return reach[:, anchor] & reach[anchor, :]


def _record(outcomes: list[Outcome], system: Hashable) -> tuple[int, int, int]:
    wins = sum(1 for o in outcomes if not o.tie and o.winner == system)
    losses = sum(1 for o in outcomes if not o.tie and o.loser == system)
    ties = sum(1 for o in outcomes if o.tie and system in (o.winner, o.loser))
    return wins, losses, ties


def _bootstrap(counts, kind_scores, kind_games, k, n_bootstrap, seed, prior_strength):
    """Ratings (natural units) refitted on `n_bootstrap` resamples of the comparisons: of single
    comparisons when `counts` is (kinds,), of whole groups when it is (groups, kinds)."""
    rng = np.random.default_rng(seed)
    if counts.ndim == 2:
        n_groups = counts.shape[0]
        times = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_bootstrap)
        resampled = times.astype(float) @ counts  # (B, kinds)
    else:
        total = int(counts.sum())
        resampled = rng.multinomial(total, counts / total, size=n_bootstrap).astype(float)
    fits = []
    # Batches bound the memory of the (B, k, k) arrays when there are many systems.
    batch = max(1, 2_000_000 // (k * k))
    for start in range(0, n_bootstrap, batch):
        c = resampled[start : start + batch]
        scores = (c @ kind_scores).reshape(-1, k, k)
        games = (c @ kind_games).reshape(-1, k, k)
        fits.append(_fit_natural(scores, games, prior_strength))
    return np.concatenate(fits)
