"""MkDocs hook: show the reST cross-reference roles of the docstrings (:func:`x`, :class:`X`) as plain code."""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):(?=<code>|<a )")


def on_page_content(html: str, **_: object) -> str:
    return ROLE.sub("", html)
