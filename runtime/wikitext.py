"""Plain prose from a MediaWiki XML dump (the Wikipedia sample shipped in gensim's wheel).

Used as extra calibration text that works offline and is disjoint from the perplexity text
(lee_background is news prose; this is encyclopedia articles). The cleaning is deliberately
simple and deterministic: redirects are skipped; templates ``{{...}}``, tables ``{|...|}``,
references, comments and HTML tags are removed; ``[[target|label]]`` links become their label,
file/category links and external-link URLs are dropped; headings, bold/italic quotes and list
markers are stripped; paragraphs shorter than ``min_chars`` (captions, list debris) are dropped.
"""
from __future__ import annotations

import html
import re

__all__ = ["articles", "plain_text"]

_PAGE = re.compile(r"<page>.*?<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>.*?</page>", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_TAG = re.compile(r"<[^>]+>")
_FILE = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I)
_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")
_EXT = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_URL = re.compile(r"https?://\S+")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)


def _drop_nested(text: str, open_: str, close: str) -> str:
    """``text`` without its (possibly nested) ``open_ ... close`` spans."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _clean(wiki: str, min_chars: int) -> str:
    t = html.unescape(wiki)                         # the dump escapes <, >, & and quotes
    t = _COMMENT.sub("", t)
    t = _REF.sub("", t)
    t = _drop_nested(t, "{{", "}}")
    t = _drop_nested(t, "{|", "|}")
    t = _FILE.sub("", t)
    t = _LINK.sub(r"\1", t)
    t = _EXT.sub(r"\1", t)
    t = _URL.sub("", t)
    t = _TAG.sub("", t)
    t = _QUOTES.sub("", t)
    t = _HEADING.sub(r"\1", t)
    paras = []
    for line in t.split("\n"):
        line = re.sub(r"\s+", " ", line.lstrip("*#:; ")).strip()
        if len(line) >= min_chars and not line.startswith(("|", "!")):
            paras.append(line)
    return "\n".join(paras)


def articles(xml: str, min_chars: int = 80) -> list[tuple[str, str]]:
    """``(title, plain text)`` of every non-redirect page of the dump ``xml`` that has prose."""
    out = []
    for title, wiki in _PAGE.findall(xml):
        if wiki.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = _clean(wiki, min_chars)
        if text:
            out.append((html.unescape(title), text))
    return out


def plain_text(xml: str, min_chars: int = 80) -> str:
    """Every article's prose (``articles``), in dump order, separated by blank lines."""
    return "\n\n".join(text for _, text in articles(xml, min_chars))
