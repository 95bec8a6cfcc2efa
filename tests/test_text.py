"""Text cleaning and word counting, on real Flickr-style descriptions."""

from __future__ import annotations

import pytest

from vsotools.core.text import clean_text, count_words, words


def test_clean_text_removes_markup_urls_and_space():
    raw = (
        'Sunset at <a href="https://www.flickr.com/x" rel="noreferrer nofollow">the beach</a>'
        " &amp; dunes.\n\n See http://flic.kr/p/abc or www.example.com  &lt;b&gt;now&lt;/b&gt;"
    )
    assert clean_text(raw) == "Sunset at the beach & dunes. See or now"


@pytest.mark.parametrize("raw", [None, "", "   ", "<br />"])
def test_empty_descriptions_clean_to_empty(raw):
    assert clean_text(raw) == ""


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("a lovely day at the sea", 6),
        ("Happy   :-) 😀 !!! ...", 1),
        ("#sunset @bob 9/11 don't", 4),
        ("___ --- ...", 0),
        ("Ünïcödé wörds zählen", 3),
        ("", 0),
    ],
)
def test_words_are_tokens_with_a_letter_or_digit(text, n):
    assert count_words(text) == n
    assert len(words(text)) == n
