"""What every search implementation shares: query text, cursors, the text of
a publication."""

from __future__ import annotations

import pytest

from server.search import BadSearch, decode_cursor, encode_cursor, extract_text, parse_text


def test_words_and_phrases_are_parsed() -> None:
    assert parse_text('Hello, "Big  Cat" world-wide "x" hello') == (
        ["hello", "world", "wide", "x"],
        [["big", "cat"]],
    )
    assert parse_text("ünïcode Straße") == (["ünïcode", "straße"], [])


def test_bad_queries_and_cursors_are_refused() -> None:
    for bad in ("", "   ", '""', "!!!", 5, None, " ".join(f"w{i}" for i in range(40)), "x" * 600):
        with pytest.raises(BadSearch):
            parse_text(bad)
    for bad in ("nope", "", 3, "eyJ4IjoxfQ", "W10"):
        with pytest.raises(BadSearch):
            decode_cursor(bad)
    assert decode_cursor(encode_cursor(12, "a|b|000000000001")) == (12, "a|b|000000000001")


def test_text_comes_from_the_configured_fields() -> None:
    data = b'{"text": "hi there", "author": {"name": "Ann", "id": 7}, "tags": ["a", "b"]}'
    assert extract_text(data, []) == "hi there\nAnn\na\nb"
    assert extract_text(data, ["author.name", "missing.path", "tags"]) == "Ann\na\nb"
    assert extract_text(b"not json", []) == ""
    assert extract_text(b'"just a string"', []) == "just a string"
