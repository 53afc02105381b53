"""Real English prose, offline: the Wikipedia articles of a dump excerpt that the PyPI package
`gensim==4.4.0` ships as test data (`make setup` installs it with --no-deps; it is found by path
and never imported). Text under CC BY-SA, as Wikipedia's.

The dump is MediaWiki XML; each article's wikitext is turned into plain paragraphs: templates,
tables, references, files, categories and markup go, links keep their shown text, headings and
list items and short lines (infobox residue) are dropped.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import re
from functools import cache
from pathlib import Path

PACKAGE = "gensim"
DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HELD_OUT_EVERY = 4  # article i is held out (for perplexity) when i % 4 == 3; the rest calibrate

_PAGE = re.compile(r"<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", re.S)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost {{...}}: removed repeatedly for nesting
_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S)
_TAG = re.compile(r"<[^>]+>")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_FILE = re.compile(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]")
_LINK = re.compile(r"\[\[(?:[^|\[\]]*\|)?([^\[\]]*)\]\]")
_EXTERNAL = re.compile(r"\[https?://[^\s\]]+\s*([^\]]*)\]")
_EMPHASIS = re.compile(r"'{2,}")
MIN_PARAGRAPH = 80  # characters; shorter lines are captions, infobox rows, navigation


def dump_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the default calibration text comes from the PyPI package {PACKAGE!r} (its Wikipedia "
                         f"test data), which is not installed: `pip install --no-deps gensim==4.4.0`, "
                         "or pass --calib-data FILE")
    path = Path(spec.submodule_search_locations[0]) / DUMP
    if not path.is_file():
        raise ValueError(f"{path} is missing: the installed {PACKAGE} is not 4.4.0 (`pip install --no-deps "
                         "gensim==4.4.0`), or pass --calib-data FILE")
    return path


def clean(wikitext: str) -> str:
    """One article's wikitext -> plain paragraphs separated by blank lines."""
    t = html.unescape(wikitext)
    t = _COMMENT.sub("", t)
    t = _REF.sub("", t)
    while True:
        stripped = _TEMPLATE.sub("", t)
        if stripped == t:
            break
        t = stripped
    t = _TABLE.sub("", t)
    t = _FILE.sub("", t)
    t = _LINK.sub(r"\1", t)
    t = _EXTERNAL.sub(r"\1", t)
    t = _TAG.sub("", t)
    t = _EMPHASIS.sub("", t)
    keep = []
    for line in t.splitlines():
        line = line.strip()
        if len(line) < MIN_PARAGRAPH or line.startswith(("=", "*", "#", ":", ";", "|", "!", "{", "}")):
            continue
        keep.append(re.sub(r"\s{2,}", " ", line))
    return "\n\n".join(keep)


@cache
def articles() -> tuple[str, ...]:
    """Every article of the dump with enough prose (redirects and stubs dropped), in dump order."""
    raw = bz2.open(dump_path(), "rt", encoding="utf-8").read()
    out = []
    for _title, text in _PAGE.findall(raw):
        if text.lstrip().upper().startswith("#REDIRECT"):
            continue
        body = clean(text)
        if len(body) >= 10 * MIN_PARAGRAPH:
            out.append(body)
    return tuple(out)


def split(held_out: bool) -> list[str]:
    """The calibration articles, or the held-out ones (disjoint)."""
    return [a for i, a in enumerate(articles()) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == held_out]
