"""Reward loading and machine labels through the Bradley-Terry model."""

import json
import math
import random

import pytest
from labeling_helpers import make_pairs, write_pairs_file
from preftune_test_data import count_reward_model_passes, reward_model_config, save_reward_model

from preftune.errors import UserError
from preftune.labeling.auto import bt_probability, label_auto
from preftune.labeling.pairs import Pair
from preftune.rewards import load_reward

REWARDS_PY = '''
def length(prompt: str, response: str) -> float:
    return float(len(response))

def batched(prompts, responses):
    return [float(len(r)) for r in responses]

def unannotated(prompt, response):
    return response.count("a")

def numpy_scalar(prompt, response):  # unannotated, answering with a 0-d NumPy number
    import numpy
    return numpy.float64(len(response))

def wrong_length(prompts, responses):
    return [1.0]

def not_a_number(prompt: str, response: str):
    return "high"

def infinite(prompt: str, response: str) -> float:
    return float("inf")

def fails_on_answer_3(prompt: str, response: str) -> float:
    if response == "second answer 3":
        raise ValueError("cannot score this one")
    return float(len(response))

def batched_fails_on_answer_3(prompts, responses):
    return [1 / 0 if r == "second answer 3" else 1.0 for r in responses]

def nan_on_answer_3(prompt: str, response: str) -> float:
    return float("nan") if response == "second answer 3" else float(len(response))

NOT_CALLABLE = 3

def one_argument(response):
    return 1.0
'''


@pytest.fixture
def rewards_file(tmp_path, monkeypatch):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bradley_terry_probability_is_stable():
    assert bt_probability(1.0, 0.0) == pytest.approx(math.exp(1) / (math.exp(1) + 1))
    assert bt_probability(0.3, -1.2) == pytest.approx(
        math.exp(0.3) / (math.exp(0.3) + math.exp(-1.2)))
    assert bt_probability(2.0, 2.0) == 0.5
    assert bt_probability(1000.0, 0.0) == 1.0 and bt_probability(0.0, 1000.0) == 0.0


def test_load_reward_specs(rewards_file):
    prompts, responses = ["x", "y"], ["aaa", "a"]
    for spec in [f"{rewards_file}:length", "my_rewards:length", "my_rewards:batched"]:
        assert load_reward(spec)(prompts, responses) == [3.0, 1.0]
    assert load_reward("my_rewards:unannotated")(prompts, ["banana", "kiwi"]) == [3.0, 0.0]
    assert load_reward("my_rewards:numpy_scalar")(prompts, responses) == [3.0, 1.0]  # one number: per pair
    assert load_reward("my_rewards:length")([], []) == []


@pytest.mark.parametrize("spec, words", [
    ("", "empty"),
    ("no_colon_here", "MODULE:FUNCTION"),
    ("surely_not_a_module_xyz:f", "no module named"),
    ("missing_file.py:f", "does not exist"),
    ("my_rewards:absent", "no function named"),
    ("my_rewards:NOT_CALLABLE", "no function named"),
    ("my_rewards:one_argument", r"takes \(response\); it must take \(prompt, response\)"),
    # A mistyped or missing folder: not a hub id to download, nor a function to write.
    ("./no_such_rm", r"^reward './no_such_rm': no such folder; check the path to the reward model's folder\.$"),
    ("/no/such/rm", r"^reward '/no/such/rm': no such folder"),
    ("~/no_such_rm", r"^reward '~/no_such_rm': no such folder"),
])
def test_bad_reward_specs_are_user_errors(rewards_file, spec, words):
    with pytest.raises(UserError, match=words):
        load_reward(spec)


@pytest.mark.parametrize("name, words", [("wrong_length", "returned 1 values"),
                                         ("not_a_number", "not a number")])
def test_bad_reward_values_are_user_errors(rewards_file, name, words):
    with pytest.raises(UserError, match=words):
        load_reward(f"my_rewards:{name}")(["p", "q"], ["a", "b"])


def test_argmax_takes_the_higher_reward_and_skips_ties(tmp_path, rewards_file):
    pairs = [Pair("long-first", "p", ("a long answer", "short")),
             Pair("long-second", [{"role": "user", "content": "hi"}], ("short", "a long answer")),
             Pair("tie", "p", ("same", "size"))]
    out = tmp_path / "D.jsonl"
    stats = label_auto(write_pairs_file(tmp_path / "pairs.jsonl", pairs), "my_rewards:length",
                       out, mode="argmax", show_progress=False)
    assert stats["written"] == 2 and stats["ties_skipped"] == 1
    rows = read_jsonl(out)
    assert rows[0]["chosen"] == "a long answer" and rows[0]["rejected"] == "short"
    assert rows[1]["chosen"] == [{"role": "assistant", "content": "a long answer"}]
    assert (rows[1]["r1"], rows[1]["r2"]) == (5.0, 13.0)
    assert rows[1]["p"] == pytest.approx(bt_probability(5.0, 13.0))


def test_bt_sample_counts_the_ties_it_draws(tmp_path, rewards_file):
    """Equal rewards make bt-sample's label a coin flip, with two or with N responses."""
    pairs = [Pair("tie", "p", ("same", "size")), Pair("no-tie", "p", ("a long answer", "short")),
             Pair("three-tied", "p", ("abc", "def", "ghi")), Pair("three", "p", ("a", "bb", "ccc"))]
    stats = label_auto(write_pairs_file(tmp_path / "pairs.jsonl", pairs), "my_rewards:length",
                       tmp_path / "D.jsonl", show_progress=False)
    assert stats["written"] == 4 and stats["ties_drawn"] == 2


def random_reward_pairs(n, seed=0):
    rng = random.Random(seed)
    rewards = {}
    pairs = []
    for i in range(n):
        pair = Pair(f"r{i:05d}", f"prompt {i}", (f"y1 of {i}", f"y2 of {i}"))
        rewards[pair.responses[0]], rewards[pair.responses[1]] = rng.gauss(0, 1.5), rng.gauss(0, 1.5)
        pairs.append(pair)
    return pairs, (lambda prompts, responses: [rewards[r] for r in responses])


def test_bt_sample_matches_the_bradley_terry_probabilities(tmp_path):
    pairs, reward = random_reward_pairs(3000)
    out = tmp_path / "D.jsonl"
    label_auto(write_pairs_file(tmp_path / "pairs.jsonl", pairs), reward, out, seed=7,
               batch_size=500, show_progress=False)
    rows = read_jsonl(out)
    assert len(rows) == 3000
    higher_won = [(r["chosen_index"] == 0) == (r["r1"] > r["r2"]) for r in rows]
    expected = [max(r["p"], 1 - r["p"]) for r in rows]
    mean_expected = sum(expected) / len(rows)
    # Each draw is Bernoulli(max(p, 1-p)): the variance of the count is sum q(1-q).
    sd = math.sqrt(sum(q * (1 - q) for q in expected)) / len(rows)
    assert abs(sum(higher_won) / len(rows) - mean_expected) < 4 * sd
    assert 0.6 < mean_expected < 0.95, "the test needs pairs that are not all near-certain"
    # p(y1 > y2) itself: response 0 wins about sum(p) times.
    wins0 = sum(r["chosen_index"] == 0 for r in rows)
    assert abs(wins0 - sum(r["p"] for r in rows)) < 4 * sd * len(rows)


def test_bt_sample_is_seeded_and_resumes_after_a_crash(tmp_path):
    pairs, reward = random_reward_pairs(200)
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", pairs)
    # The killed run's reward is a different function object: name it as the same reward.
    named = {"show_progress": False, "reward_name": "gauss"}
    full = tmp_path / "full.jsonl"
    label_auto(pairs_file, reward, full, seed=3, batch_size=16, **named)
    other_seed = tmp_path / "other.jsonl"
    label_auto(pairs_file, reward, other_seed, seed=4, batch_size=16, **named)
    assert full.read_bytes() != other_seed.read_bytes()

    calls = 0

    def dies_on_fourth_batch(prompts, responses):
        nonlocal calls
        calls += 1
        if calls == 4:
            raise KeyboardInterrupt
        return reward(prompts, responses)

    resumed = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        label_auto(pairs_file, dies_on_fourth_batch, resumed, seed=3, batch_size=16, **named)
    assert len(read_jsonl(resumed)) == 48
    with open(resumed, "ab") as f:  # and a kill in the middle of a write
        f.write(b'{"prompt": "half a li')
    stats = label_auto(pairs_file, reward, resumed, seed=3, batch_size=50, **named)
    assert stats["resumed_from"] == 48 and stats["written"] == 152
    assert resumed.read_bytes() == full.read_bytes()
    again = label_auto(pairs_file, reward, resumed, seed=3, **named)
    assert again.get("written", 0) == 0, "a finished run writes nothing more"


def test_auto_refuses_mixed_runs_and_bad_rewards(tmp_path, rewards_file):
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(4))
    out = tmp_path / "D.jsonl"
    label_auto(pairs_file, "my_rewards:length", out, mode="bt-sample", show_progress=False)
    with pytest.raises(UserError, match="same settings"):
        label_auto(pairs_file, "my_rewards:length", out, mode="argmax", show_progress=False)
    with pytest.raises(UserError, match="pairs file"):
        label_auto(write_pairs_file(tmp_path / "other.jsonl", make_pairs(2, prefix="q")),
                   "my_rewards:length", out, show_progress=False)
    with pytest.raises(UserError, match="finite"):
        label_auto(pairs_file, "my_rewards:infinite", tmp_path / "inf.jsonl", show_progress=False)
    with pytest.raises(UserError, match="mode"):
        label_auto(pairs_file, "my_rewards:length", tmp_path / "x.jsonl", mode="coin")


def test_a_reward_that_raises_names_the_pair_and_keeps_what_was_written(tmp_path, rewards_file):
    """A reward function that raised on one pair was a traceback from inside the labeling loop,
    which named neither the pair nor whether the rows before it were kept."""
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(6))
    out = tmp_path / "D.jsonl"
    with pytest.raises(UserError, match=r"my_rewards:fails_on_answer_3 raised ValueError: cannot score "
                       r"this one \(.*my_rewards.py, line \d+\) while scoring response 1 of pair 'p00003'; "
                       r".*D.jsonl keeps 2 rows labeled so far: fix the function and rerun"):
        label_auto(pairs_file, "my_rewards:fails_on_answer_3", out, batch_size=2, show_progress=False)
    assert [row["pair_id"] for row in read_jsonl(out)] == ["p00000", "p00001"]
    with pytest.raises(UserError, match=r"raised ZeroDivisionError: division by zero \(.*my_rewards.py, line \d+\) while "
                       r"scoring one of pairs 'p00000' to 'p00003'; nothing is in .*D2.jsonl yet"):
        label_auto(pairs_file, "my_rewards:batched_fails_on_answer_3", tmp_path / "D2.jsonl",
                   batch_size=4, show_progress=False)


def test_a_reward_that_is_not_finite_names_the_pair_and_keeps_what_was_written(tmp_path, rewards_file):
    """A NaN or infinite reward named the pair, but unlike a reward that raised, not how many
    rows the file keeps nor that a rerun continues."""
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(6))
    out = tmp_path / "D.jsonl"
    with pytest.raises(UserError, match=r"^the reward my_rewards:nan_on_answer_3 returned \d+\.0 and nan for pair "
                       r"'p00003', and rewards must be finite numbers; .*D.jsonl keeps 2 rows labeled so "
                       r"far: fix the function and rerun the same command to continue\.$"):
        label_auto(pairs_file, "my_rewards:nan_on_answer_3", out, batch_size=2, show_progress=False)
    assert [row["pair_id"] for row in read_jsonl(out)] == ["p00000", "p00001"]
    with pytest.raises(UserError, match=r"returned inf and inf for pair 'p00000', and rewards must be finite "
                       r"numbers; nothing is in .*inf.jsonl yet: fix the function and rerun"):
        label_auto(pairs_file, "my_rewards:infinite", tmp_path / "inf.jsonl", show_progress=False)


def test_out_in_a_new_folder_is_written_and_a_folder_as_out_is_named(tmp_path, rewards_file):
    """label auto appended to --out without creating its folder (a traceback), and --out naming
    a folder was a traceback too."""
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(2))
    out = tmp_path / "new" / "D.jsonl"
    label_auto(pairs_file, "my_rewards:length", out, mode="argmax", show_progress=False)
    assert len(read_jsonl(out)) == 2
    with pytest.raises(UserError, match="is a folder; name the file"):
        label_auto(pairs_file, "my_rewards:length", tmp_path / "new", show_progress=False)
    with pytest.raises(UserError, match="D.jsonl cannot be a folder, a file holds its place"):
        label_auto(pairs_file, "my_rewards:length", out / "D.jsonl", show_progress=False)


def test_out_naming_the_pairs_file_is_refused_and_the_file_kept(tmp_path, rewards_file):
    """Resuming into the pairs file itself cut its last line when it had no newline, then
    advised deleting it."""
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(2))
    text = pairs_file.read_text().rstrip("\n")
    pairs_file.write_text(text)
    with pytest.raises(UserError, match="is the --pairs file itself"):
        label_auto(pairs_file, "my_rewards:length", pairs_file, show_progress=False)
    assert pairs_file.read_text() == text


def test_bad_pairs_files_name_the_line(tmp_path):
    with pytest.raises(UserError, match="a folder, not a file"):  # it said "no such file"
        label_auto(tmp_path, lambda p, r: [0.0] * len(r), tmp_path / "D.jsonl")
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"pair_id": "a", "prompt": "p", "responses": ["x", "y"]}\n\n'
                   '{"pair_id": "b", "prompt": "p", "responses": ["x"]}\n')
    with pytest.raises(UserError, match=r"pairs.jsonl, line 3: 'responses'"):
        label_auto(bad, lambda p, r: [0.0] * len(r), tmp_path / "D.jsonl")
    bad.write_text('{"pair_id": "a", "prompt": [{"role": "user"}], "responses": ["x", "y"]}\n')
    with pytest.raises(UserError, match="line 1: prompt message 0"):
        label_auto(bad, lambda p, r: [0.0] * len(r), tmp_path / "D.jsonl")
    bad.write_text('{"pair_id": "a", "prompt": "p", "responses": ["x", "y"]}\n' * 2)
    with pytest.raises(UserError, match="line 2: pair_id 'a' already used on line 1"):
        label_auto(bad, lambda p, r: [0.0] * len(r), tmp_path / "D.jsonl")


def test_a_local_reward_model_scores_prompt_plus_response(tmp_path):
    import torch
    import transformers

    from preftune.demo.tiny import train_tokenizer

    tokenizer = train_tokenizer()
    config = reward_model_config(tokenizer)
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config).eval()
    folder = tmp_path / "rm"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    reward = load_reward(str(folder), batch_size=2)
    prompts = ["The quick brown fox", "What is", [{"role": "user", "content": "hello"}]]
    responses = [" jumps over the lazy dog.", " the best ice cream?", "how can I help you?"]
    batched = reward(prompts, responses)
    one_by_one = [reward([p], [r])[0] for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(one_by_one, abs=1e-4), "padding must not change scores"
    with torch.no_grad():
        ids = tokenizer(prompts[0] + responses[0], return_tensors="pt")
        assert batched[0] == pytest.approx(model(**ids).logits[0, 0].item(), abs=1e-4)
    chat = tokenizer.apply_chat_template(
        prompts[2] + [{"role": "assistant", "content": responses[2]}], tokenize=False)
    with torch.no_grad():
        direct = model(**tokenizer(chat, return_tensors="pt")).logits[0, 0].item()
    assert batched[2] == pytest.approx(direct, abs=1e-4)

    # A hub id, as TRL scripts take one: one sentence, and nothing is downloaded.
    with pytest.raises(UserError, match="'Skywork/Skywork-Reward-V2' is not a folder here.*never downloaded"):
        load_reward("Skywork/Skywork-Reward-V2")

    # Weights saved without their tokenizer: the sentence named the classifier, which loads fine.
    model.save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(UserError, match="the classifier loads but no tokenizer does.*save the reward "
                                        "model's tokenizer in that folder too"):
        load_reward(str(tmp_path / "no-tokenizer"))

    config.num_labels = 2
    transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm2")
    tokenizer.save_pretrained(tmp_path / "rm2")
    with pytest.raises(UserError, match="exactly one"):
        load_reward(str(tmp_path / "rm2"))


def test_an_error_inside_a_reward_model_folders_scoring_keeps_its_traceback(tmp_path, monkeypatch):
    """What preftune's (or torch's) scoring of a reward model folder raised was turned into the
    sentence for a user's reward function: 'fix the function', and the traceback dropped."""
    import transformers

    import preftune.rewards
    from preftune.demo.tiny import train_tokenizer

    tokenizer = train_tokenizer()
    folder = tmp_path / "rm"
    transformers.LlamaForSequenceClassification(reward_model_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    def broken(*args):
        raise RuntimeError("a bug in the scoring code")

    monkeypatch.setattr(preftune.rewards, "_cut", broken)
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(2))
    with pytest.raises(RuntimeError, match="a bug in the scoring code"):
        label_auto(pairs_file, str(folder), tmp_path / "D.jsonl", show_progress=False)


def test_reward_batch_size_sets_the_texts_per_forward_pass_and_not_the_scores(
        tmp_path, monkeypatch, rewards_file):
    """A reward model folder scored 8 texts per forward pass whatever the GPU; --batch-size set
    only the pairs per call. --reward-batch-size sets the pass, and calls grow to hold one."""
    folder = save_reward_model(tmp_path / "rm")
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(10))  # 20 texts
    passes = count_reward_model_passes(monkeypatch)
    scores = {}
    for name, sizes in (("default", {}), ("three", {"reward_batch_size": 3}),
                        ("eight", {"reward_batch_size": 8, "batch_size": 2})):
        passes.clear()
        label_auto(pairs_file, str(folder), tmp_path / f"{name}.jsonl", show_progress=False, **sizes)
        scores[name] = [(row["r1"], row["r2"]) for row in read_jsonl(tmp_path / f"{name}.jsonl")]
        assert passes == {"default": [8, 8, 4], "three": [3] * 6 + [2], "eight": [8, 8, 4]}[name], name
    for name in ("three", "eight"):
        assert [r for pair in scores[name] for r in pair] == pytest.approx(
            [r for pair in scores["default"] for r in pair], abs=1e-4), name
    with pytest.raises(UserError, match=r"--reward-batch-size must be at least 1, got 0\."):
        label_auto(pairs_file, str(folder), tmp_path / "zero.jsonl", reward_batch_size=0)
    with pytest.raises(UserError, match=r"^--reward-batch-size sets the texts a reward model folder scores per "
                                        r"forward pass, but the reward my_rewards:length is a function; drop it"):
        label_auto(pairs_file, "my_rewards:length", tmp_path / "f.jsonl", reward_batch_size=4)


def test_a_reward_model_folder_under_home_is_found_by_tilde(tmp_path, monkeypatch):
    """--reward ~/rm (quoted, or from a script) read '~' as a folder name and said to download it."""
    import transformers

    from preftune.demo.tiny import train_tokenizer

    tokenizer = train_tokenizer()
    transformers.LlamaForSequenceClassification(reward_model_config(tokenizer)).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(load_reward("~/rm")(["Hi"], [" there"])) == 1


def test_a_last_line_without_newline_is_kept_or_named(tmp_path):
    from preftune.labeling.pairs import load_pairs

    path = tmp_path / "pairs.jsonl"
    row = '{"pair_id": "%s", "prompt": "p", "responses": ["x", "y"]}'
    path.write_text(row % "a" + "\r\n" + row % "b")  # hand-written: CRLF, no final newline
    assert [p.pair_id for p in load_pairs(path)] == ["a", "b"]
    path.write_text(row % "a" + "\n" + (row % "b")[:20])
    with pytest.raises(UserError, match="line 2: the last line is cut off"):
        load_pairs(path)


def test_a_pairs_file_without_read_permission_is_one_sentence(tmp_path, monkeypatch):
    """`preftune label auto --pairs` (and serve, import) printed a PermissionError traceback."""
    from preftune_test_data import deny_reading

    from preftune.labeling.pairs import load_pairs

    path = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(2))
    deny_reading(monkeypatch, path)
    with pytest.raises(UserError, match=f"{path} cannot be read: no permission to read it"):
        load_pairs(path)


# Empty responses: training refuses them. Identical ones (greedy decoding writes them): neither
# can be preferred, and bt-sample would turn them into chosen == rejected rows.
@pytest.mark.parametrize("skipped, counter", [
    ([Pair("empty", "p", ("an answer", "")), Pair("blank", "p", ("  \n", "an answer"))], "empty_skipped"),
    ([Pair("same", "p", ("one answer", "one answer"))], "identical_skipped"),
])
@pytest.mark.parametrize("mode", ["argmax", "bt-sample"])
def test_pairs_that_cannot_be_labeled_are_skipped_and_counted(tmp_path, rewards_file, mode, skipped, counter):
    pairs = [*skipped, Pair("kept", "p", ("a long answer", "short"))]
    out = tmp_path / "D.jsonl"
    stats = label_auto(write_pairs_file(tmp_path / "pairs.jsonl", pairs), "my_rewards:length",
                       out, mode=mode, show_progress=False)
    assert stats["written"] == 1 and stats[counter] == len(skipped)
    assert [r["pair_id"] for r in read_jsonl(out)] == ["kept"]


def test_resume_refuses_another_pairs_file_with_the_same_pair_ids(tmp_path, rewards_file):
    # `preftune sample` numbers every file p000000, p000001, ...: ids alone cannot tell files apart.
    pairs_a = write_pairs_file(tmp_path / "a.jsonl", [
        Pair("p000000", "Tell me about cats", ("cats purr", "cats nap")),
        Pair("p000001", "Tell me about dogs", ("dogs bark", "dogs run"))])
    pairs_b = write_pairs_file(tmp_path / "b.jsonl", [
        Pair("p000000", "What is rain", ("water falling", "wet")),
        Pair("p000001", "What is snow", ("cold", "frozen rain")),
        Pair("p000002", "What is hail", ("ice", "balls of ice"))])
    out = tmp_path / "D.jsonl"
    label_auto(pairs_a, "my_rewards:length", out, show_progress=False)
    before = out.read_bytes()
    with pytest.raises(UserError, match=r"D.jsonl, line 1: the prompt or responses of pair "
                                        r"'p000000' differ.*another --out"):
        label_auto(pairs_b, "my_rewards:length", out, show_progress=False)
    assert out.read_bytes() == before, "a refused run leaves the file as it was"
    # The same prompt with other responses (a resample) is another pair too.
    resampled = write_pairs_file(tmp_path / "a2.jsonl", [
        Pair("p000000", "Tell me about cats", ("cats purr", "cats nap")),
        Pair("p000001", "Tell me about dogs", ("dogs bark", "dogs sleep"))])
    with pytest.raises(UserError, match="line 2: the prompt or responses of pair 'p000001'"):
        label_auto(resampled, "my_rewards:length", out, show_progress=False)


def test_resume_refuses_another_reward(tmp_path, rewards_file):
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(4))
    out = tmp_path / "D.jsonl"
    label_auto(pairs_file, "my_rewards:length", out, show_progress=False)
    assert {r["reward"] for r in read_jsonl(out)} == {"my_rewards:length"}
    with pytest.raises(UserError, match=r"D.jsonl, line 1: written by another job "
                                        r"\(reward='my_rewards:length'.*another --out"):
        label_auto(pairs_file, "my_rewards:batched", out, show_progress=False)
    with pytest.raises(UserError, match="another job"):
        label_auto(pairs_file, lambda p, r: [0.0] * len(r), out, show_progress=False)
    again = label_auto(pairs_file, "my_rewards:length", out, show_progress=False)
    assert again["resumed_from"] == 4 and again.get("written", 0) == 0


def test_resume_refuses_rows_that_do_not_name_their_reward(tmp_path, rewards_file):
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(3))
    out = tmp_path / "D.jsonl"
    label_auto(pairs_file, "my_rewards:length", out, show_progress=False)
    rows = read_jsonl(out)
    del rows[1]["reward"]  # as an older preftune wrote them
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"D.jsonl, line 2: .*does not record which reward"):
        label_auto(pairs_file, "my_rewards:length", out, show_progress=False)


def test_resume_refuses_a_pair_labeled_twice(tmp_path, rewards_file):
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", make_pairs(2))
    out = tmp_path / "D.jsonl"
    label_auto(pairs_file, "my_rewards:length", out, show_progress=False)
    first = out.read_text().splitlines()[0]
    with open(out, "a") as f:
        f.write("\n" + first + "\n")  # a blank line, then line 1 again
    with pytest.raises(UserError, match="line 4: pair 'p00000' was already labeled on line 1"):
        label_auto(pairs_file, "my_rewards:length", out, show_progress=False)




@pytest.mark.parametrize("padding_side, has_pad", [("right", True), ("left", False)])
def test_a_reward_model_sees_one_bos_whatever_the_batch(tmp_path, padding_side, has_pad):
    """A tokenizer that adds BOS and a chat template that writes it too (Llama 3's way): the
    rendered chat must be scored as apply_chat_template(tokenize=True) encodes it, with one BOS,
    and a score must not depend on the batch size, the padding side or a missing pad token."""
    import torch
    import transformers
    from tokenizers import processors

    from preftune.demo.tiny import BOS, CHAT_TEMPLATE, train_tokenizer

    tokenizer = train_tokenizer()
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.bos_token_id)])
    tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    config = reward_model_config(tokenizer)
    tokenizer.padding_side = padding_side
    if not has_pad:
        tokenizer.pad_token = None
        config.pad_token_id = None
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config).eval()
    folder = tmp_path / "rm"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
               "What is the best ice cream?"] * 5
    responses = ["how can I help you today?", " Haagen-Dazs is rich and creamy."] * 5
    one = load_reward(str(folder), batch_size=1)(prompts, responses)
    many = load_reward(str(folder), batch_size=32)(prompts, responses)
    assert many == pytest.approx(one, abs=1e-5)
    chat = prompts[0] + [{"role": "assistant", "content": responses[0]}]
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_tensors="pt")
    assert ids["input_ids"][0, :2].tolist() != [tokenizer.bos_token_id] * 2  # the template's BOS alone
    text_ids = tokenizer(prompts[1] + responses[1], return_tensors="pt")
    with torch.no_grad():
        assert one[0] == pytest.approx(model(**ids).logits[0, 0].item(), abs=1e-5)
        assert one[1] == pytest.approx(model(**text_ids).logits[0, 0].item(), abs=1e-5)


def test_a_reward_model_without_a_pad_token_scores_where_its_config_says(tmp_path):
    """A tokenizer without a pad token beside a model config with one: padding with EOS made the
    head score the token before a chat turn's closing EOS, not the one the model was saved to
    score; the model's own pad id keeps the score as `model(**ids)` gives it."""
    import torch
    import transformers

    from preftune.demo.tiny import train_tokenizer

    tokenizer = train_tokenizer()
    config = reward_model_config(tokenizer)
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config).eval()
    tokenizer.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + "
                               "'<|eos|>' }}{% endfor %}")  # a turn ends with EOS, nothing after it
    tokenizer.pad_token = None
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")

    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "how can I help you?"}]
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_tensors="pt")
    assert ids["input_ids"][0, -1].item() == tokenizer.eos_token_id
    prompts, responses = [chat[:1], "Hi"] * 3, [chat[1]["content"], " there, friend"] * 3
    one = load_reward(str(tmp_path / "rm"), batch_size=1)(prompts, responses)
    assert load_reward(str(tmp_path / "rm"), batch_size=4)(prompts, responses) == pytest.approx(one, abs=1e-5)
    with torch.no_grad():
        assert one[0] == pytest.approx(model(**ids).logits[0, 0].item(), abs=1e-5)


def test_texts_cut_at_the_reward_models_max_length_are_counted(tmp_path, capsys):
    """A reward model cuts a text longer than its max_position_embeddings before scoring, so the
    score misses the text's end; label auto and eval --judge say how many were cut, not a word
    was said before."""
    import torch
    import transformers

    from preftune.demo.tiny import train_tokenizer
    from preftune.eval_generate import Judge, Samples, score

    tokenizer = train_tokenizer()
    config = reward_model_config(tokenizer)
    config.max_position_embeddings = 8
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    long = " jumps over the lazy dog, and naps in the sun."
    lengths = [len(tokenizer("Hi" + r)["input_ids"]) for r in ("!", long)]
    assert lengths[0] <= 8 < lengths[1]  # only the second response is cut

    pairs = write_pairs_file(tmp_path / "pairs.jsonl", [Pair("a", "Hi", ("!", long))])
    stats = label_auto(pairs, str(tmp_path / "rm"), tmp_path / "D.jsonl", show_progress=False)
    assert stats["reward_truncated"] == 1 and stats["reward_max_length"] == 8

    reward = load_reward(str(tmp_path / "rm"))
    samples = Samples("pi", "pi", ["!", long], [[]] * 2, [[]] * 2, [1, 12])
    score(Judge("reward", str(tmp_path / "rm"), reward), ["Hi", "Hi"], samples)
    assert "1 of 2 responses of pi (with their prompts) were longer than the reward model's 8 tokens" in (
        capsys.readouterr().err)


def test_a_reward_model_scores_in_the_dtype_it_was_saved_in(tmp_path, monkeypatch):
    """README: a reward-model folder runs in the dtype its config.json names. transformers 5
    loads that by default but 4.x (which preftune allows) loads float32, so it is asked for."""
    import torch
    import transformers

    from preftune.demo.tiny import train_tokenizer

    tokenizer = train_tokenizer()
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(reward_model_config(tokenizer)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    asked = []
    real = transformers.AutoModelForSequenceClassification.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained",
                        lambda *args, **kwargs: asked.append(kwargs.get("dtype")) or real(*args, **kwargs))
    score = load_reward(str(tmp_path / "rm"))(["Hi"], [" there"])[0]
    assert asked == ["auto"]
    with torch.no_grad():
        assert score == model.eval()(**tokenizer("Hi there", return_tensors="pt")).logits[0, 0].item()


# ArmoRM's layout: a Llama config (a model_type transformers knows) whose auto_map sends
# AutoModelForSequenceClassification to a class in the folder, with a head of its own name.
ARMO_STYLE_PY = '''
import torch
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class ArmoStyleReward(LlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = torch.nn.Linear(config.hidden_size, 1, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        last = attention_mask.cumsum(-1).argmax(-1)  # (B,) the last real token, either padding side
        score = self.regression_layer(hidden[torch.arange(len(last)), last])  # (B, 1)
        return SequenceClassifierOutput(logits=score)
'''


def test_a_reward_model_with_its_own_code_needs_trust_remote_code(tmp_path):
    """An ArmoRM-style folder ships its model class. Without --trust-remote-code it gets one
    sentence naming the flag (transformers would build the stock Llama classifier, with a head
    the weights do not fill, and score at random); with it, the folder's class scores."""
    import importlib.util

    import torch

    from preftune.demo.tiny import train_tokenizer
    from preftune.labeling.cli import app

    folder = tmp_path / "armo"
    folder.mkdir()
    (folder / "armo_style.py").write_text(ARMO_STYLE_PY)
    module_spec = importlib.util.spec_from_file_location("armo_style_in_test", folder / "armo_style.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    tokenizer = train_tokenizer()
    config = reward_model_config(tokenizer)
    config.auto_map = {"AutoModelForSequenceClassification": "armo_style.ArmoStyleReward"}
    torch.manual_seed(0)
    model = module.ArmoStyleReward(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["auto_map"]

    with pytest.raises(UserError, match=r"Python code that ships in that folder .*armo_style\.ArmoStyleReward.*"
                                        r"add --trust-remote-code if you trust that code\."):
        load_reward(str(folder))
    reward = load_reward(str(folder), batch_size=2, trust_remote_code=True)
    prompts, responses = ["The quick brown fox", "Hi"], [" jumps over the lazy dog.", " there"]
    with torch.no_grad():
        direct = [model(**tokenizer(p + r, return_tensors="pt")).logits[0, 0].item()
                  for p, r in zip(prompts, responses)]
    assert reward(prompts, responses) == pytest.approx(direct, abs=1e-4)

    # The command line: the flag is named without it, and passed on with it.
    from typer.testing import CliRunner

    pairs = write_pairs_file(tmp_path / "pairs.jsonl", [Pair("a", prompts[0], (responses[0], " naps."))])
    args = ["auto", "--pairs", str(pairs), "--reward", str(folder), "--out", str(tmp_path / "D.jsonl"),
            "--argmax", "--no-progress"]
    refused = CliRunner().invoke(app, args)
    assert isinstance(refused.exception, UserError) and "--trust-remote-code" in str(refused.exception)
    assert not (tmp_path / "D.jsonl").exists()
    result = CliRunner().invoke(app, [*args, "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert "wrote 1 row (argmax)" in result.output


# ------------------------------------------------------------ N > 2 responses per prompt


def test_argmax_with_four_responses_takes_the_best_and_the_worst(tmp_path, rewards_file):
    pairs = [Pair("four", "p", ("medium one", "the longest answer", "x", "short")),
             Pair("chat", [{"role": "user", "content": "hi"}], ("yo", "hello there", "hey", "hi")),
             # an empty response and a repeat are left out before picking, and counted
             Pair("gaps", "p", ("", "tiny", "a longer one", "tiny")),
             Pair("ties", "p", ("abc", "xyz", "def")),
             Pair("one-left", "p", ("", "only this", " ")),
             Pair("all-same", "p", ("twin", "twin", "")),
             Pair("two", "p", ("a long answer", "short"))]  # two responses: today's row
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "D.jsonl"
    stats = label_auto(pairs_file, "my_rewards:length", out, mode="argmax", show_progress=False)
    assert stats["written"] == 4 and stats["ties_skipped"] == 1
    assert stats["empty_skipped"] == 1 and stats["identical_skipped"] == 1
    assert stats["empty_dropped"] == 1 and stats["duplicates_dropped"] == 1
    rows = {r["pair_id"]: r for r in read_jsonl(out)}
    four = rows["four"]
    assert (four["chosen"], four["rejected"]) == ("the longest answer", "x")
    assert (four["chosen_index"], four["rejected_index"]) == (1, 2)
    assert four["rewards"] == [10.0, 18.0, 1.0, 5.0] and four["candidates"] == [0, 1, 2, 3]
    assert rows["chat"]["chosen"] == [{"role": "assistant", "content": "hello there"}]
    assert rows["chat"]["rejected"] == [{"role": "assistant", "content": "yo"}]  # first of 2.0, 2.0
    assert (rows["chat"]["chosen_index"], rows["chat"]["rejected_index"]) == (1, 0)
    gaps = rows["gaps"]
    assert (gaps["chosen_index"], gaps["rejected_index"], gaps["candidates"]) == (2, 1, [1, 2])
    assert gaps["rewards"] == [0.0, 4.0, 12.0, 4.0]
    assert set(rows["two"]) == {"prompt", "chosen", "rejected", "pair_id", "r1", "r2", "p",
                                "chosen_index", "reward", "label", "seed"}
    # A rerun finds every row its own and writes nothing more.
    again = label_auto(pairs_file, "my_rewards:length", out, mode="argmax", show_progress=False)
    assert again["resumed_from"] == 4 and again.get("written", 0) == 0
    changed = [Pair("four", "p", ("medium one", "the longest answer", "y", "short")), *pairs[1:]]
    with pytest.raises(UserError, match="the prompt or responses of pair 'four' differ"):
        label_auto(write_pairs_file(tmp_path / "changed.jsonl", changed), "my_rewards:length",
                   out, mode="argmax", show_progress=False)


def test_bt_sample_with_three_responses_follows_plackett_luce(tmp_path):
    # Rewards 0, 1, 2 (placed as responses 2, 0, 1): weights 1, e, e^2, their sum S.
    n = 3000
    reward_of = {"low": 0.0, "mid": 1.0, "high": 2.0}
    pairs = [Pair(f"k{i:05d}", f"prompt {i}", (f"mid {i}", f"high {i}", f"low {i}")) for i in range(n)]
    reward = lambda prompts, responses: [reward_of[r.split()[0]] for r in responses]  # noqa: E731
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "D.jsonl"
    label_auto(pairs_file, reward, out, seed=11, batch_size=500, show_progress=False,
               reward_name="fixed")
    rows = read_jsonl(out)
    assert len(rows) == n and all(r["rewards"] == [1.0, 2.0, 0.0] for r in rows)
    e = math.e
    s = 1 + e + e ** 2
    # First place: exp(r_i) / S.
    p_first_high, p_first_mid = e ** 2 / s, e / s
    # Last place: the low one is last when high then mid, or mid then high, are drawn first;
    # the high one is last when low then mid, or mid then low, are.
    p_last_low = (e ** 2 / s) * (e / (1 + e)) + (e / s) * (e ** 2 / (1 + e ** 2))
    p_last_high = (1 / s) * (e / (e + e ** 2)) + (e / s) * (1 / (1 + e ** 2))
    for p, count in [(p_first_high, sum(r["chosen_index"] == 1 for r in rows)),
                     (p_first_mid, sum(r["chosen_index"] == 0 for r in rows)),
                     (p_last_low, sum(r["rejected_index"] == 2 for r in rows)),
                     (p_last_high, sum(r["rejected_index"] == 1 for r in rows))]:
        standard_error = math.sqrt(p * (1 - p) / n)
        assert abs(count / n - p) < 5 * standard_error, (count / n, p)
    assert all(r["chosen"].split()[0] == ("mid", "high", "low")[r["chosen_index"]] for r in rows)
    # Seeded by (seed, pair_id): the same run writes the same file, whatever the batch size.
    again = tmp_path / "again.jsonl"
    label_auto(pairs_file, reward, again, seed=11, batch_size=7, show_progress=False,
               reward_name="fixed")
    assert again.read_bytes() == out.read_bytes()


# Written by `label auto` before it took more than two responses (rewards len/4, seed 5):
# records with two responses must still give these rows, byte for byte, draws included.
TWO_RESPONSE_PAIRS = [
    {"pair_id": "t0", "prompt": "Tell me about cats", "responses": ["cats purr", "cats nap all day"]},
    {"pair_id": "t1", "prompt": [{"role": "user", "content": "hi"}], "responses": ["hello there", "hey"],
     "truncated": [True, False]},
    {"pair_id": "t2", "prompt": "p", "responses": ["same", "size"]},
    {"pair_id": "t3", "prompt": "p", "responses": ["", "empty"]},
    {"pair_id": "t4", "prompt": "q", "responses": ["twin", "twin"]},
    {"pair_id": "t5", "prompt": "r", "responses": ["a much longer answer", "no"]},
]
TWO_RESPONSE_ROWS = {
    "bt-sample": [
        '{"prompt": "Tell me about cats", "chosen": "cats nap all day", "rejected": "cats purr", "pair_id": "t0", "r1": 2.25, "r2": 4.0, "p": 0.1480471980316895, "chosen_index": 1, "reward": "len/4", "label": "bt-sample", "seed": 5}',  # noqa: E501
        '{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello there"}], "rejected": [{"role": "assistant", "content": "hey"}], "pair_id": "t1", "chosen_truncated": true, "r1": 2.75, "r2": 0.75, "p": 0.8807970779778823, "chosen_index": 0, "reward": "len/4", "label": "bt-sample", "seed": 5}',  # noqa: E501
        '{"prompt": "p", "chosen": "size", "rejected": "same", "pair_id": "t2", "r1": 1.0, "r2": 1.0, "p": 0.5, "chosen_index": 1, "reward": "len/4", "label": "bt-sample", "seed": 5}',  # noqa: E501
        '{"prompt": "r", "chosen": "a much longer answer", "rejected": "no", "pair_id": "t5", "r1": 5.0, "r2": 0.5, "p": 0.9890130573694068, "chosen_index": 0, "reward": "len/4", "label": "bt-sample", "seed": 5}',  # noqa: E501
    ],
    "argmax": [
        '{"prompt": "Tell me about cats", "chosen": "cats nap all day", "rejected": "cats purr", "pair_id": "t0", "r1": 2.25, "r2": 4.0, "p": 0.1480471980316895, "chosen_index": 1, "reward": "len/4", "label": "argmax", "seed": 5}',  # noqa: E501
        '{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello there"}], "rejected": [{"role": "assistant", "content": "hey"}], "pair_id": "t1", "chosen_truncated": true, "r1": 2.75, "r2": 0.75, "p": 0.8807970779778823, "chosen_index": 0, "reward": "len/4", "label": "argmax", "seed": 5}',  # noqa: E501
        '{"prompt": "r", "chosen": "a much longer answer", "rejected": "no", "pair_id": "t5", "r1": 5.0, "r2": 0.5, "p": 0.9890130573694068, "chosen_index": 0, "reward": "len/4", "label": "argmax", "seed": 5}',  # noqa: E501
    ],
}


@pytest.mark.parametrize("mode", ["bt-sample", "argmax"])
def test_two_response_rows_are_unchanged(tmp_path, mode):
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in TWO_RESPONSE_PAIRS))
    # A three-response record among them must not shift the others' draws or rows.
    with open(pairs_file, "a") as f:
        f.write(json.dumps({"pair_id": "t6", "prompt": "s", "responses": ["a", "bb", "ccc"]}) + "\n")
    out = tmp_path / "D.jsonl"
    stats = label_auto(pairs_file, lambda prompts, responses: [len(r) / 4 for r in responses], out,
                       mode=mode, seed=5, show_progress=False, reward_name="len/4")
    lines = out.read_text().splitlines()
    assert lines[:-1] == TWO_RESPONSE_ROWS[mode]
    three = json.loads(lines[-1])
    assert three["pair_id"] == "t6" and three["rewards"] == [0.25, 0.5, 0.75]
    assert stats["written"] == len(lines)
    assert stats["empty_skipped"] == 1 and stats["identical_skipped"] == 1


def test_every_response_of_a_record_must_be_text(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"pair_id": "a", "prompt": "p", "responses": ["x", "y", 3]}\n')
    with pytest.raises(UserError, match="line 1: every one of the 'responses' must be a string"):
        label_auto(bad, lambda p, r: [0.0] * len(r), tmp_path / "D.jsonl")


def test_a_full_disk_mid_run_is_one_sentence_and_the_rerun_ends_as_an_uninterrupted_run(tmp_path, monkeypatch):
    # It was an OSError traceback, with part of the batch left as a torn last line.
    import errno
    import os

    pairs, reward = random_reward_pairs(100)
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", pairs)
    named = {"show_progress": False, "reward_name": "gauss", "seed": 3, "batch_size": 16}
    full = tmp_path / "full.jsonl"
    label_auto(pairs_file, reward, full, **named)

    out = tmp_path / "D.jsonl"
    real_write, writes = os.write, []

    def full_at_the_fourth_batch(fd, data):  # part of the batch fits, then the disk is full
        writes.append(fd)
        if len(writes) == 4:
            real_write(fd, bytes(data[: len(data) // 3]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_at_the_fourth_batch)
    with pytest.raises(UserError, match=r"^out of disk space while writing .*D\.jsonl; the records written "
                                        r"before are kept; free some space and run the same command again"):
        label_auto(pairs_file, reward, out, **named)
    monkeypatch.undo()
    assert out.read_bytes().endswith(b"\n") and len(read_jsonl(out)) == 48
    stats = label_auto(pairs_file, reward, out, **named)
    assert stats["resumed_from"] == 48
    assert out.read_bytes() == full.read_bytes()
