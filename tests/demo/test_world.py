"""The synthetic review world: its prompts, its reviews and the latent sentiment reward."""

import random
import statistics

import pytest

from preftune.demo import world
from preftune.demo.world import sentiment_reward


def test_positive_beats_neutral_beats_negative():
    prompt = "The movie"
    positive = sentiment_reward(prompt, " was wonderful and moving. I loved the acting.")
    neutral = sentiment_reward(prompt, " was long. The music was loud.")
    negative = sentiment_reward(prompt, " was boring and awful. I hated the acting.")
    assert positive > 1.0
    assert neutral == 0.0
    assert negative < -1.0


def test_a_stronger_word_and_an_intensifier_score_higher():
    assert sentiment_reward("The plot", " was great.") > sentiment_reward("The plot", " was good.")
    assert sentiment_reward("The plot", " was very good.") > sentiment_reward("The plot", " was good.")
    # "very" multiplies "good" (+1.0) by 1.5: raw 1.5, reward 5 * tanh(1.5 / 6).
    assert sentiment_reward("The plot", " was very good.") == pytest.approx(5 * 0.244918662, abs=1e-6)


def test_negation_flips_with_damping():
    good = sentiment_reward("The plot", " was good.")
    not_good = sentiment_reward("The plot", " was not good.")
    assert not_good < 0 < good
    assert abs(not_good) < abs(good)  # "not good" is milder than "good" is positive
    assert sentiment_reward("The plot", " was not bad.") > 0
    assert sentiment_reward("I watched it and", " did not enjoy it.") < 0
    assert sentiment_reward("I watched it and", " wasn't impressed, it was dull.") < 0
    assert sentiment_reward("I", " would not recommend it.") < 0


def test_negation_scope_ends_at_but_and_punctuation_and_distance():
    assert sentiment_reward("The plot", " was not long but great.") > 0
    assert sentiment_reward("The plot", " was not long. It was great.") > 0
    # "not" reaches a sentiment word at most NEGATION_WINDOW words later.
    assert sentiment_reward("It", " was not a good film.") < 0
    assert sentiment_reward("It", " was not what one might call good.") > 0


def test_a_negator_at_the_end_of_the_prompt_reaches_into_the_response():
    assert sentiment_reward("The movie was not", " good at all.") < 0
    # Prompt words themselves are not scored.
    assert sentiment_reward("The wonderful movie", " was long.") == 0.0


def test_rewards_are_bounded_and_case_insensitive():
    gush = sentiment_reward("The movie", " was excellent." * 30)
    assert 4.9 < gush < world.REWARD_BOUND
    assert sentiment_reward("The movie", " was GREAT!") == sentiment_reward("The movie", " was great!")


def test_batch_form_matches_the_pair_form():
    prompts, responses = ["The cast", "The plot"], [" was good.", " was dull."]
    assert world.sentiment_rewards(prompts, responses) == [
        sentiment_reward(p, r) for p, r in zip(prompts, responses)
    ]
    with pytest.raises(ValueError):
        world.sentiment_rewards(prompts, responses[:1])


def test_reviews_and_prompts_are_deterministic_given_the_seed():
    assert world.make_reviews(50, seed=3) == world.make_reviews(50, seed=3)
    assert world.make_reviews(50, seed=3) != world.make_reviews(50, seed=4)
    assert world.make_prompts(30, seed=1) == world.make_prompts(30, seed=1)
    assert world.make_prompts(30, seed=1) != world.make_prompts(30, seed=2)


def test_splits_are_disjoint_and_cover_every_opening():
    train, heldout = world.review_openings("train"), world.review_openings("heldout")
    assert set(train).isdisjoint(heldout)
    assert sorted(train + heldout) == sorted(world.review_openings("all"))
    assert 10 <= len(heldout) <= len(train) / 2
    prompts = world.make_prompts(len(train) + 5, "train")
    assert set(prompts) == set(train)  # one full pass, then the start of the next
    assert len(set(world.make_prompts(len(heldout), "heldout"))) == len(heldout)


def test_reviews_continue_their_opening_and_span_both_sentiments():
    rng = random.Random(0)
    pairs = [world.make_review(rng) for _ in range(600)]
    assert all(c.startswith(" ") and c.endswith(".") for _, c in pairs)
    rewards = [sentiment_reward(o, c) for o, c in pairs]
    assert statistics.pstdev(rewards) > 2.0
    assert 0.35 < sum(r > 0 for r in rewards) / len(rewards) < 0.65
    assert max(rewards) > 3.5 and min(rewards) < -3.5


def test_every_lexicon_word_scores_with_its_sign():
    for word, weight in world.LEXICON.items():
        reward = sentiment_reward("It", f" {word}.")
        assert (reward > 0) == (weight > 0), word


def test_the_vocabulary_stays_small():
    vocabulary = {w for review in world.make_reviews(2000) for w in world.words(review)}
    assert len(vocabulary) < 130
