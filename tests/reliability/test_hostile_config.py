"""Property-based tests: whatever a config file or override holds, `load_config` returns a
Config or raises one UserError that names the key (or, for text that is not YAML at all, the
file and line). Anything accepted survives the round trip through the `config.yaml` a run
writes for its resume command."""

from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preftune.config import Config, dump_config, load_config
from preftune.errors import UserError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BASE = {"model": {"path": "runs/tiny-model"}, "data": {"train": "examples/tiny_prefs.jsonl"}}


def dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += dotted_keys(value, prefix + key + ".")
    return keys


# Every key of the schema, sections included, from a full dump of a valid config.
ALL_KEYS = dotted_keys(Config.model_validate(BASE).model_dump(mode="json"))

unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
junk_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                      st.floats(allow_nan=True, allow_infinity=True), unicode_text,
                      st.sampled_from(["1e-3", "yes", "~", "null", ".inf", "-.nan", "0x1F", "1_000", "[", "{a"]))
junk = st.recursive(junk_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(unicode_text, inner, max_size=3)), max_leaves=8)


def set_key(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        if not isinstance(tree.get(part), dict):
            tree[part] = {}
        tree = tree[part]
    tree[last] = value


def load_text(text: bytes, overrides=()):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_bytes(text)
        try:
            return load_config(path, list(overrides)), str(path)
        except UserError as e:
            return e, str(path)


def assert_round_trips(config: Config) -> None:
    with tempfile.TemporaryDirectory() as folder:
        dump_config(config, Path(folder) / "config.yaml")
        assert load_config(Path(folder) / "config.yaml") == config


@SETTINGS
@given(key=st.sampled_from(ALL_KEYS), value=junk)
def test_a_junk_value_at_any_key_loads_or_names_that_key(key, value):
    raw = copy.deepcopy(BASE)
    set_key(raw, key, value)
    result, _ = load_text(yaml.safe_dump(raw, allow_unicode=True).encode())
    if isinstance(result, UserError):
        # The key itself or one beneath it (a union's branch, a list position, a missing child).
        assert re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", str(result)), (key, value, str(result))
    else:
        assert_round_trips(result)


@SETTINGS
@given(key=st.sampled_from(ALL_KEYS), name=unicode_text.filter(lambda s: s and "." not in s), value=junk_leaf)
def test_an_unknown_key_is_named(key, name, value):
    raw = copy.deepcopy(BASE)
    # The name as YAML reads it back (YAML folds line breaks like U+0085 in keys into spaces).
    [name] = yaml.safe_load(yaml.safe_dump({name: 0}, allow_unicode=True))
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    unknown = f"{parent}.{name}" if parent else name
    if unknown in ALL_KEYS:
        return
    set_key(raw, unknown, value)
    result, _ = load_text(yaml.safe_dump(raw, allow_unicode=True).encode())
    assert isinstance(result, UserError)
    assert f"unknown key {unknown!r}" in str(result), (unknown, str(result))


text_edits = st.lists(st.tuples(st.sampled_from(["cut", "insert", "bom", "crlf"]), st.integers(0, 10**6),
                                st.sampled_from(["\t", ":", "- ", "{", "[", "\"", "'", "&a ", "*a", "!!python/object ",
                                                 "\x00", "\x85", "\u2028", "%", "@", "? ", "\n  ", "#"])),
                      max_size=4)


@SETTINGS
@given(edits=text_edits, overrides=st.lists(st.tuples(st.sampled_from(ALL_KEYS + ["nope.x", "", "model..path"]),
                                                       st.one_of(unicode_text, st.sampled_from(["[", "{", "1" * 5000]))),
                                             max_size=3))
def test_damaged_yaml_text_and_overrides_end_in_a_config_or_a_user_error(edits, overrides):
    text = yaml.safe_dump(BASE)
    for edit, position, snippet in edits:
        at = position % (len(text) + 1)
        if edit == "cut":
            text = text[:at]
        elif edit == "insert":
            text = text[:at] + snippet + text[at:]
        elif edit == "bom":
            text = "\ufeff" + text
        else:
            text = text.replace("\n", "\r\n")
    result, path = load_text(text.encode("utf-8"), [f"{k}={v}" for k, v in overrides])
    if isinstance(result, UserError):
        message = str(result)
        assert "YAML" not in message or path in message or "override" in message, message
    else:
        assert_round_trips(result)


@pytest.mark.parametrize("text, expected", [
    (b"- a\n- b\n", "expected a mapping"),
    (b"[" * 10_000, "nested too deeply"),
    (b"model: {path: x}\ndata: {train: y}\ntrain: {seed: " + b"1" * 5000 + b"}\n", "unreadable YAML value"),
    (b"model: {path: x}\ndata: {train: y}\noptim: {lr: .nan}\n", "'optim.lr'"),
    (b"model: {path: x}\ndata: {train: y}\noptim: {lr: .inf}\n", "'optim.lr'"),
    (b"\xff\xfe", "not UTF-8"),
    (b"model: {path: x}\ndata: {train: y}\n\tloss: {}\n", ", line 3: not valid YAML"),
    (b"model: {path: x}\ndata: {train: y}\nmodel: {reference: none}\n", "line 3: not valid YAML (key 'model' is "
     "written twice"),  # duplicate key
])
def test_hand_picked_hostile_configs(tmp_path, text, expected):
    path = tmp_path / "config.yaml"
    path.write_bytes(text)
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert expected in str(caught.value)


def test_overrides_into_a_list_config_or_an_empty_section(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml", ["train.seed=1"])
    with pytest.raises(UserError, match="override 'optim.lr=\\[', line 1: not valid YAML"):
        load_config(None, ["optim.lr=["])
    (tmp_path / "empty_section.yaml").write_text("model: {path: x}\ndata: {train: y}\ntrain:\n")
    assert load_config(tmp_path / "empty_section.yaml", ["train.seed=3"]).train.seed == 3
