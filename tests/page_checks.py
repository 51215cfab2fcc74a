"""Checks of a results page (``icm.report``) against the records it was made from, shared by the
tests of the jobs that write those records."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.cells: list[tuple[str, str, str]] = []      # (record file, JSON pointer, text)
        self.commands: list[str] = []
        self._record = None
        self._cell = None
        self._pre = None
        self.open_tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in ("img", "meta", "br"):
            self.open_tags.append(tag)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "table":
            self._record = attrs.get("data-record")
        elif tag == "td" and "data-pointer" in attrs:
            self._cell = [self._record, attrs["data-pointer"], ""]
        elif tag == "pre" and attrs.get("class") == "command":
            self._pre = ""

    def handle_endtag(self, tag):
        assert self.open_tags and self.open_tags[-1] == tag, f"</{tag}> closes {self.open_tags[-1:]}"
        self.open_tags.pop()
        if tag == "td" and self._cell is not None:
            self.cells.append(tuple(self._cell))
            self._cell = None
        elif tag == "pre" and self._pre is not None:
            self.commands.append(self._pre)
            self._pre = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[2] += data
        if self._pre is not None:
            self._pre += data


def _at(doc, ptr: str):
    for raw in ptr.split("/")[1:]:
        key = raw.replace("~1", "/").replace("~0", "~")
        doc = doc[int(key)] if isinstance(doc, list) else doc[key]
    return doc


def _shows(text: str, value) -> bool:
    if value is None:
        return text == "—"
    if isinstance(value, bool):
        return text == ("yes" if value else "no")
    if isinstance(value, (int, float)):
        return math.isclose(float(text), value, rel_tol=1e-3, abs_tol=1e-9)
    return text == str(value)


def check_page(page: Path, figures: bool = True) -> dict[str, set[str]]:
    """The page parses (every tag closed in order), every image it names exists (and it names one,
    with ``figures``), and every table cell equals the value its record holds at the cell's pointer
    (the record read here, with json). Returns the pointers shown, per record file (resolved), for
    the caller's coverage checks."""
    parser = _Page()
    parser.feed(page.read_text(encoding="utf-8"))
    parser.close()
    assert parser.open_tags == [], f"unclosed tags {parser.open_tags}"
    assert parser.images or not figures, "the page shows no figure"
    for src in parser.images:
        assert "://" not in src and not src.startswith("/"), f"{src}: not a relative link"
        assert (page.parent / src).is_file(), f"{src} does not exist"
    shown: dict[str, set[str]] = {}
    records: dict[str, object] = {}
    assert parser.cells, "the page has no table"
    for record, ptr, text in parser.cells:
        path = str((page.parent / record).resolve())
        doc = records.setdefault(path, json.loads(Path(path).read_text()))
        value = _at(doc, ptr)
        assert _shows(text.strip(), value), f"{record}{ptr}: page shows {text!r}, the record holds {value!r}"
        shown.setdefault(path, set()).add(ptr)
    return shown


def page_commands(page: Path) -> list[str]:
    parser = _Page()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.commands
