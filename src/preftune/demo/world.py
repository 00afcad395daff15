"""A synthetic movie-review world: the demo's stand-in for IMDb controlled sentiment.

The DPO paper (Rafailov et al. 2023, section 6.1) starts from a model that continues the opening
of an IMDb movie review, and asks DPO to make its continuations positive; a sentiment classifier
plays the humans, and preferences are drawn from its scores with Bradley-Terry. This module
builds a miniature of that task that a tiny model learns in a minute on a CPU:

* **Prompts** are review openings, a discourse marker plus a subject ("Honestly, the acting") or
  a first-person lead-in ("I watched this film last night and"). About a fifth of the openings
  are held out (`split="heldout"`) for evaluation; the split is fixed, not seeded.
* **Reviews** are generated from a small grammar (about 120 words) with a per-review polarity
  drawn uniformly from [-1, 1]. Every sentiment slot then picks a positive, negative or neutral
  phrase with probabilities set by that polarity, sometimes intensified ("really dull") or
  negated ("not bad"). Reviews therefore span the whole range from glowing through mixed to
  scathing, and a model trained on them does too: DPO has something to shift.
* **The latent reward** `sentiment_reward(prompt, response)` sums a weighted lexicon over the
  response's words: intensifiers scale the next sentiment word, negators ("not", "never",
  "wasn't") flip it with damping (`NEGATION_FACTOR`) within a few words, and "but" or
  punctuation end the negation's scope. The sum is squashed with 5 * tanh(sum / REWARD_SCALE),
  so rewards lie in (-5, 5) and, as Bradley-Terry log-odds, make clear differences near-certain
  preferences and small ones coin flips.

Everything is deterministic given the seed; nothing here needs torch.
"""

from __future__ import annotations

import math
import random
import re
import zlib
from collections.abc import Sequence

# --- The latent reward's lexicon -----------------------------------------------------------

POSITIVE_ADJECTIVES = {
    "excellent": 2.5, "wonderful": 2.5, "brilliant": 2.5, "great": 2.0, "beautiful": 1.5,
    "moving": 1.5, "charming": 1.5, "clever": 1.5, "good": 1.0, "fun": 1.0, "funny": 1.0,
    "solid": 1.0, "fine": 0.5,
}
NEGATIVE_ADJECTIVES = {
    "terrible": -2.5, "awful": -2.5, "boring": -2.0, "painful": -2.0, "bad": -1.5,
    "dull": -1.5, "poor": -1.5, "weak": -1.0, "silly": -1.0, "messy": -1.0, "predictable": -1.0,
}
# Words the lexicon ignores: reviews use them so that not every slot carries sentiment.
NEUTRAL_ADJECTIVES = ["long", "loud", "dark", "simple", "quiet", "strange", "short", "different"]
POSITIVE_VERBS = {"loved": 2.0, "enjoyed": 1.5, "liked": 1.0}
NEGATIVE_VERBS = {"hated": -2.0, "disliked": -1.5}
# Base forms appear after "did not" ("I did not enjoy it").
BASE_FORMS = {"love": 2.0, "enjoy": 1.5, "like": 1.0, "hate": -2.0, "recommend": 1.5}

LEXICON: dict[str, float] = {
    **POSITIVE_ADJECTIVES, **NEGATIVE_ADJECTIVES, **POSITIVE_VERBS, **NEGATIVE_VERBS, **BASE_FORMS,
}
INTENSIFIERS = {"very": 1.5, "really": 1.5, "truly": 1.5, "so": 1.5, "quite": 1.25}
NEGATORS = {"not", "never", "hardly", "no"}  # and any word ending in n't
SCOPE_BREAKS = {"but", ".", "!", "?", ",", ";"}
NEGATION_WINDOW = 3  # a negator reaches the first sentiment word within this many words
NEGATION_FACTOR = -0.75  # "not good" is milder than "bad"; "not bad" is mildly positive
REWARD_SCALE = 6.0  # raw lexicon sums of about +-6 (two or three strong words) map to +-3.8
REWARD_BOUND = 5.0

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|[.!?,;]")


def words(text: str) -> list[str]:
    """Lower-cased words and sentence punctuation, the units the lexicon reads."""
    return _WORD.findall(text.lower())


def lexicon_scores(tokens: Sequence[str]) -> list[float]:
    """Each word's contribution to the raw sentiment sum, after intensifiers and negation."""
    scores = []
    negation_left = 0  # words the last negator still reaches
    boost = 1.0
    for word in tokens:
        value = 0.0
        if word in SCOPE_BREAKS:
            negation_left, boost = 0, 1.0
        elif word in NEGATORS or word.endswith("n't"):
            negation_left = NEGATION_WINDOW
        elif word in INTENSIFIERS:
            boost = INTENSIFIERS[word]
        elif word in LEXICON:
            value = LEXICON[word] * boost * (NEGATION_FACTOR if negation_left > 0 else 1.0)
            negation_left, boost = 0, 1.0
        else:
            negation_left = max(0, negation_left - 1)
            boost = 1.0
        scores.append(value)
    return scores


def sentiment_reward(prompt: str, response: str) -> float:
    """The latent reward r*(x, y) in (-5, 5): the sentiment of the continuation `response`.

    Only the response's words are scored, but the prompt is read first, so a prompt that ends in
    a negator ("... was not") negates the response's first sentiment word.
    """
    prompt_words, response_words = words(prompt), words(response)
    raw = sum(lexicon_scores(prompt_words + response_words)[len(prompt_words):])
    return REWARD_BOUND * math.tanh(raw / REWARD_SCALE)


def sentiment_rewards(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """`sentiment_reward` over aligned lists, the batch form of a preftune reward function."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [sentiment_reward(p, r) for p, r in zip(prompts, responses)]


# --- Prompts: review openings ---------------------------------------------------------------

DISCOURSE_MARKERS = ["", "Honestly,", "Overall,", "To be fair,", "In the end,", "For me,", "At first,"]
SUBJECTS = [
    "the movie", "this film", "the acting", "the story", "the plot", "the ending", "the music",
    "the cast", "the script", "the dialogue", "the characters", "the jokes", "the first hour",
    "the lead actor",
]
FIRST_PERSON_OPENINGS = [
    "I watched this film last night and", "My friends and I saw it and",
    "I went to see this movie and", "We rented this one and", "I saw it at the festival and",
    "My wife and I watched it and", "I finally saw this film and",
]
ASPECTS = [
    "acting", "story", "plot", "ending", "music", "cast", "script", "dialogue", "characters",
    "jokes", "camera work", "pacing", "lead actor", "soundtrack",
]
PLURAL_NOUNS = {"characters", "jokes"}
HELDOUT_EVERY = 5  # about one opening in five is held out for evaluation


def _subject_openings() -> list[str]:
    openings = []
    for marker in DISCOURSE_MARKERS:
        for subject in SUBJECTS:
            text = f"{marker} {subject}" if marker else subject
            openings.append(text[0].upper() + text[1:])
    return openings


def review_openings(split: str = "all") -> list[str]:
    """The prompts of the world: "train", "heldout" or "all" openings, in a fixed order."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be train, heldout or all, got {split!r}")
    openings = _subject_openings() + FIRST_PERSON_OPENINGS
    if split == "all":
        return openings
    # A hash of the text, not a position or a seed: the split never moves when lists grow.
    held = [zlib.crc32(o.encode()) % HELDOUT_EVERY == 0 for o in openings]
    return [o for o, h in zip(openings, held) if h == (split == "heldout")]


def make_prompts(n: int, split: str = "train", seed: int = 0) -> list[str]:
    """`n` prompts from a split: shuffled passes over its openings, repeated as needed."""
    rng = random.Random(f"prompts/{split}/{seed}")
    pool = review_openings(split)
    prompts: list[str] = []
    while len(prompts) < n:
        rng.shuffle(pool)
        prompts.extend(pool[: n - len(prompts)])
    return prompts


# --- Reviews: the pretraining corpus -----------------------------------------------------------


class _ReviewWriter:
    """Writes one review with polarity in [-1, 1]: +1 is glowing, -1 is scathing."""

    def __init__(self, rng: random.Random, polarity: float):
        self.rng, self.polarity = rng, polarity

    def _sign(self) -> int:
        """+1, -1 or 0 (neutral) for one sentiment slot."""
        if self.rng.random() < 0.15:
            return 0
        return 1 if self.rng.random() < (1 + self.polarity) / 2 else -1

    def adjective_phrase(self) -> str:
        sign = self._sign()
        if sign == 0:
            return self.rng.choice(NEUTRAL_ADJECTIVES)
        roll = self.rng.random()
        if roll < 0.2:  # negate a word of the other polarity: "not bad" for a positive slot
            other = NEGATIVE_ADJECTIVES if sign > 0 else POSITIVE_ADJECTIVES
            return "not " + self.rng.choice(list(other))
        lexicon = POSITIVE_ADJECTIVES if sign > 0 else NEGATIVE_ADJECTIVES
        adjective = self.rng.choice(list(lexicon))
        if roll < 0.45:
            return f"{self.rng.choice(list(INTENSIFIERS))} {adjective}"
        return adjective

    def verb_phrase(self) -> str:
        """What "I" did: "loved", "did not enjoy" and the like."""
        sign = self._sign() or self.rng.choice([1, -1])
        if self.rng.random() < 0.2:
            bases = [b for b, w in BASE_FORMS.items() if (w < 0) == (sign > 0) and b != "recommend"]
            return "did not " + self.rng.choice(bases)
        return self.rng.choice(list(POSITIVE_VERBS if sign > 0 else NEGATIVE_VERBS))

    def first_clause(self, opening: str) -> str:
        """The words that complete the opening's sentence."""
        rng = self.rng
        if opening in FIRST_PERSON_OPENINGS:
            form = rng.choice(["{v} it", "thought it was {a}", "found it {a}", "{v} every minute"])
        else:
            form = rng.choice(["was {a}", "is {a}", "felt {a}", "was {a} and {a}", "was {a} but {a}"])
            if opening.split()[-1] in PLURAL_NOUNS:
                form = form.replace("was", "were").replace("is", "are")
        while "{a}" in form:
            form = form.replace("{a}", self.adjective_phrase(), 1)
        return form.replace("{v}", self.verb_phrase())

    def sentence(self) -> str:
        rng = self.rng
        form = rng.choice([
            "The {x} was {a}.", "The {x} was {a} but the {x} was {a}.", "I {v} the {x}.",
            "It is {n} film.", "The {x} felt {a} and the {x} was {a}.", "I would {r} it.",
        ])
        while "{x}" in form:
            aspect = rng.choice(ASPECTS)
            form = form.replace("{x}", aspect, 1)
            if aspect in PLURAL_NOUNS:  # the verb right after this subject agrees with it
                form = form.replace(f"{aspect} was", f"{aspect} were", 1)
        while "{a}" in form:
            form = form.replace("{a}", self.adjective_phrase(), 1)
        if "{n}" in form:
            phrase = self.adjective_phrase()
            negated = phrase.startswith("not ")  # "not a bad film", never "a not bad film"
            phrase = phrase.removeprefix("not ")
            article = "an " if phrase[0] in "aeiou" else "a "
            form = form.replace("{n}", ("not " if negated else "") + article + phrase)
        if "{r}" in form:  # recommending follows the review's overall polarity
            form = form.replace("{r}", "recommend" if self.polarity > 0 else "not recommend")
        return form.replace("{v}", self.verb_phrase())


def make_review(rng: random.Random, opening: str | None = None) -> tuple[str, str]:
    """One review as (opening, continuation); the continuation starts with a space."""
    opening = opening or rng.choice(review_openings("all"))
    writer = _ReviewWriter(rng, polarity=rng.uniform(-1.0, 1.0))
    parts = [writer.first_clause(opening) + "."]
    parts += [writer.sentence() for _ in range(rng.randint(1, 3))]
    return opening, " " + " ".join(parts)


def make_reviews(n: int, seed: int = 0) -> list[str]:
    """`n` full reviews (opening + continuation), the corpus pi_sft is trained on."""
    rng = random.Random(f"reviews/{seed}")
    return ["".join(make_review(rng)) for _ in range(n)]
