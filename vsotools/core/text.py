"""Text: cleaning Flickr descriptions, tokenising them, and counting words.

Words are the tokens of nltk's ``TweetTokenizer`` (a regular-expression tokenizer that needs no
downloaded data) that contain at least one letter or digit, so punctuation and emoji do not count.
The same tokenizer feeds the word counts of ``filter`` and the vocabulary of ``train``.
"""

from __future__ import annotations

import html
import re

from nltk.tokenize import TweetTokenizer

_TAG = re.compile(r"<[^>]*>")
_URL = re.compile(r"(?:https?://|ftp://|www\.)\S+", re.IGNORECASE)
_SPACE = re.compile(r"\s+")
_LETTER_OR_DIGIT = re.compile(r"[^\W_]")  # \w without the underscore

_TOKENIZER = TweetTokenizer(preserve_case=True)


def clean_text(raw: str | None) -> str:
    """Text as the models read it: HTML tags removed, entities unescaped, URLs removed,
    whitespace collapsed."""
    if not raw:
        return ""
    text = _TAG.sub(" ", raw)
    text = html.unescape(text)
    # A second pass: escaped markup (&lt;b&gt;) unescapes into tags that are still not words.
    text = _TAG.sub(" ", text)
    text = _URL.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def tokenize(text: str) -> list[str]:
    """TweetTokenizer tokens of ``text``, case preserved (punctuation and emoji included)."""
    return _TOKENIZER.tokenize(text)


def is_word(token: str) -> bool:
    """A token counts as a word when it contains at least one letter or digit."""
    return _LETTER_OR_DIGIT.search(token) is not None


def words(text: str) -> list[str]:
    """The tokens of ``text`` that are words."""
    return [t for t in tokenize(text) if is_word(t)]


def count_words(text: str) -> int:
    """Number of words in ``text`` (see ``words``)."""
    search = _LETTER_OR_DIGIT.search
    return sum(1 for t in tokenize(text) if search(t))
