"""Page-level opt-outs: the `<meta>` tags of the page an image was found on.

A page that says `<meta name="robots" content="noai, noimageai">` (or `noml`), or TDMRep's
`<meta name="tdm-reservation" content="1">`, asks that its content, images included, not be used
for training. wat_extract records the reason in the `page_opt_out` column of every pair of such a
page; download then does not fetch those rows (`opted_out`, source `page_meta`) unless
`download.respect_page_opt_out` is false.

The same rules serve both inputs: WAT's `HTML-Metadata.Head.Metas` (a list of objects with
`name` / `property` / `http-equiv` and `content`) and the `<meta>` tags of a WARC response's HTML.
Pure functions: no Spark, no I/O.
"""

from __future__ import annotations

from typing import Iterable

# `<meta name=...>` values that address us: every robot, or our own product token.
ROBOTS_META_NAMES = frozenset({"robots", "clipcrawl"})
# Directives that mean "not for AI/ML use". noindex is about search engines and is not one of them.
ROBOTS_OPT_OUT_VALUES = ("noai", "noimageai", "noml")
TDM_META_NAME = "tdm-reservation"


def reason(metas: Iterable[tuple[str | None, str | None]]) -> str | None:
    """The first opt-out among (name, content) meta pairs, as `robots=noai` or
    `tdm-reservation=1`, else None. Names are case-insensitive; robots content is a comma (or
    space) separated directive list."""
    for name, content in metas:
        if not name or content is None:
            continue
        name = name.strip().lower()
        if name in ROBOTS_META_NAMES:
            directives = content.lower().replace(",", " ").split()
            for value in ROBOTS_OPT_OUT_VALUES:
                if value in directives:
                    return f"{name}={value}"
        elif name == TDM_META_NAME and content.strip() == "1":
            return f"{TDM_META_NAME}=1"
    return None


def from_wat_head(head) -> str | None:
    """The opt-out of a WAT `HTML-Metadata.Head` object (its `Metas` list), else None."""
    metas = head.get("Metas") if isinstance(head, dict) else None
    if not isinstance(metas, list) or not metas:
        return None
    return reason((m.get("name"), m.get("content")) for m in metas
                  if isinstance(m, dict) and isinstance(m.get("name"), str)
                  and isinstance(m.get("content"), str))


def from_html_tree(tree) -> str | None:
    """The opt-out of a parsed page (a selectolax tree): its `<meta name content>` tags."""
    return reason((node.attributes.get("name"), node.attributes.get("content"))
                  for node in tree.css("meta[name]"))
