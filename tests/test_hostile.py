"""Hostile and random input: the parser never lets an exception escape, every rejection says why, and each
known attack is refused quickly."""

from __future__ import annotations

import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.errors import Category
from daemon.jobspec import reader
from daemon.jobspec.reader import MAX_DEPTH, MAX_NODES
from daemon.jobspec.spec import parse_job_file

LIMIT = 1 << 20


def check(data: bytes) -> None:
    entries, err = parse_job_file(data, "fuzz.yaml", max_bytes=LIMIT)
    if err is not None:
        assert err.category is Category.INVALID_SPEC and err.message.strip()
        assert entries == []
    for e in entries:
        assert (e.spec is None) != (e.error is None)
        if e.error is not None:
            assert e.error.message.strip()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_random_bytes_never_escape_the_parser(data):
    check(data)


yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True), st.text(max_size=40)
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = [
    "id",
    "task",
    "model",
    "prompt",
    "negative_prompt",
    "image",
    "size",
    "width",
    "height",
    "frames",
    "fps",
    "steps",
    "guidance_scale",
    "guidance_scale_2",
    "flow_shift",
    "seed",
    "priority",
    "output",
    "fallback",
    "jobs",
    "defaults",
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), yaml_values, max_size=8))
def test_random_job_documents_are_accepted_or_rejected_with_a_reason(doc):
    import yaml

    check(yaml.safe_dump(doc, allow_unicode=True).encode())


def _alias_bomb() -> bytes:
    lines = ["a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]")
    return ("\n".join(lines) + "\nprompt: hi\n").encode()


# name -> (bytes, a word of the error, the most YAML parser events the reader may consume before refusing).
# Work is bounded, not timed (wall-clock limits fail on a loaded machine; bench/hostile.py times them).
CORPUS = {
    "alias bomb": (_alias_bomb(), "anchors", 6),  # refused at the first anchor
    "python tag": (b"prompt: !!python/object/apply:os.system ['touch /tmp/pwned']\n", "python/object", 20),
    "python name": (b"prompt: !!python/name:os.system\n", "python/name", 20),
    "10 MB file": (b"prompt: " + b"a" * (10 << 20) + b"\n", "limit", 0),  # refused on its size, unparsed
    "deep nesting": (b"prompt: " + b"[" * 10000 + b"]" * 10000 + b"\n", "nest", MAX_DEPTH + 6),
    "deep mapping": (b"".join(b" " * i + b"k:\n" for i in range(600)) + b" " * 600 + b"v\n", "nest", 2 * MAX_DEPTH + 8),
    "many nodes": (b"jobs: [" + b"1," * 200000 + b"1]\n", "too many YAML nodes", MAX_NODES + 8),
    "NUL byte": (b"prompt: a\x00b\n", "NUL", 0),
    "bad UTF-8": (b"prompt: \xff\xfe\n", "UTF-8", 0),
    "duplicate keys": (b"prompt: a\nprompt: b\n", "duplicate", 20),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_hostile_corpus_is_rejected_after_bounded_work(name, monkeypatch):
    data, needle, max_events = CORPUS[name]
    read = [0]
    real_parse = yaml.parse

    def counting_parse(*args, **kwargs):
        for event in real_parse(*args, **kwargs):
            read[0] += 1
            yield event

    real_compose = reader._HardenedLoader.compose_node

    def counting_compose(self, parent, index):
        read[0] += 1
        return real_compose(self, parent, index)

    # Counts the reader's work: events pulled from the parser by the pre-scan, and nodes composed after it.
    monkeypatch.setattr(yaml, "parse", counting_parse)
    monkeypatch.setattr(reader._HardenedLoader, "compose_node", counting_compose)
    entries, err = parse_job_file(data, "evil.yaml", max_bytes=LIMIT)
    assert err is not None and entries == [], name
    assert needle in err.message, err.message
    assert read[0] <= max_events, f"{name}: {read[0]} parser events and nodes (bound {max_events})"
    assert not os.path.exists("/tmp/pwned")


@pytest.mark.parametrize("hostile", ["../../etc/passwd", "/etc/passwd", "a/../../b", "..", "sub/../../x"])
def test_traversal_in_image_paths_is_refused(tmp_path, hostile):
    from daemon.fsutil import open_confined

    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError):
        with open_confined(hostile, [tmp_path / "sub"], max_bytes=100):
            pass
