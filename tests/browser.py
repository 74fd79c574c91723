"""Headless Chromium for the tests: a page's DOM after loading, a screenshot, and what the
page wrote to the browser console.

Debian's ``chromium`` package provides the browser (``make test`` installs it when run as
root); without one, tests marked with :data:`requires_chromium` are skipped and say why.
Chromium writes console messages to stderr with ``--enable-logging=stderr`` as lines holding
``:CONSOLE``; its level is not shown there, so every console message counts. The report
runs no script, so only the browser itself writes there: script errors, refused requests
(the page's content security policy), resources that failed to load.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
requires_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH: the report is checked in a real browser; install Debian's "
                             "chromium (apt-get install chromium; `make test` does it when run as root)")
CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]\s*(.*)")
TIMEOUT_S = 120


@dataclass
class Rendered:
    """A page as the browser showed it."""

    dom: str
    console: list[str]
    screenshot: Path


def _chromium(page: Path, profile: Path, *args) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args,
               page.resolve().as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def render(page: Path, workdir: Path, width=1280, height=2000) -> Rendered:
    """Load ``page`` twice in headless Chromium: once to dump the DOM, once for a
    ``width`` x ``height`` screenshot; the console messages of both loads."""
    dump = _chromium(page, workdir / "profile", "--dump-dom")
    png = workdir / f"{page.stem}.png"
    shot = _chromium(page, workdir / "profile", f"--screenshot={png}", f"--window-size={width},{height}",
                     "--hide-scrollbars")
    console = [m.group(1) for run in (dump, shot) for line in run.stderr.splitlines() if (m := CONSOLE.search(line))]
    return Rendered(dump.stdout, console, png)


def pixel_spread(png: Path) -> float:
    """Standard deviation of a screenshot's grey levels: about 0 for a blank page."""
    return float(np.asarray(Image.open(png).convert("L"), dtype=np.float32).std())


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.links, self.stack = set(), [], []
        self.sections: dict[str, list[str]] = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        self.links += [attrs[key] for key in ("src", "href") if attrs.get(key) is not None]
        if tag == "section":
            self.stack.append(attrs.get("id"))
        elif self.stack and tag == "img" and self.stack[-1]:
            self.sections.setdefault(self.stack[-1], []).append(attrs.get("title", ""))

    def handle_endtag(self, tag):
        if tag == "section" and self.stack:
            self.stack.pop()


@dataclass
class PageContents:
    """What the tests read from a page: every element id, every ``src`` and ``href``
    value, and the ``title`` of each image per section id."""

    ids: set[str]
    links: list[str]
    images: dict[str, list[str]]


def contents(html: str) -> PageContents:
    collector = _Collector()
    collector.feed(html)
    return PageContents(collector.ids, collector.links, collector.sections)


def section_html(html: str, section: str) -> str:
    """The HTML of the section with id ``section`` (sections do not nest)."""
    start = html.index(f'<section id="{section}"')
    return html[start: html.index("</section>", start)]
