"""The documented key normalisation (udfs/dedup/dedup_keys.py), pure Python."""

from __future__ import annotations

import pytest

from udfs.dedup import dedup_keys as K

# (raw url, raw text) pairs that must give the same key as the first of their group
SAME = [
    [("http://example.com/a.jpg", "a red circle"),
     ("HTTP://EXAMPLE.COM/a.jpg", "a red circle"),
     ("http://Example.Com/a.jpg#section-2", "  a\u00a0red\t\ncircle "),
     (" http://example.com/a.jpg# ", "a \u3000 red \u2003circle")],
    [("https://user:PW@cdn.EXAMPLE.org:8443/Img.PNG?W=1", "x"),
     ("HTTPS://user:PW@CDN.example.ORG:8443/Img.PNG?W=1#f", "x")],
]
# pairs that must stay different from each other
DIFFERENT = [
    ("http://example.com/a.jpg", "a red circle"),
    ("http://example.com/A.jpg", "a red circle"),       # path is case-sensitive
    ("http://example.com/a.jpg?x=1", "a red circle"),   # query kept
    ("http://example.com/a.jpg", "A red circle"),       # caption case kept
    ("http://example.com/a.jpg", "a red circle."),
    ("https://example.com/a.jpg", "a red circle"),
    ("http://USER@example.com/a.jpg", "a red circle"),   # user-info kept as is
    ("http://user@example.com/a.jpg", "a red circle"),
]


@pytest.mark.parametrize("group", SAME)
def test_equivalent_pairs_share_a_key(group):
    keys = {K.pair_key(u, t) for u, t in group}
    assert len(keys) == 1, keys


def test_different_pairs_keep_different_keys():
    keys = [K.pair_key(u, t) for u, t in DIFFERENT]
    assert len(set(keys)) == len(keys)


def test_rules_are_idempotent_and_handle_nulls_and_odd_urls():
    for url, text in [p for g in SAME for p in g] + DIFFERENT:
        key = K.pair_key(url, text)
        u, t = key.split("\t")
        assert K.pair_key(u, t) == key
        assert "\t" not in t
    assert K.pair_key(None, None) == "\t"
    assert K.url_key("//CDN.x/a#b") == "//CDN.x/a"  # no scheme: only the fragment goes
    assert K.url_key("data:image/png;base64,AAAA") == "data:image/png;base64,AAAA"
    assert K.normalize_text("\u2028a\u0085b\x1fc\u205f") == "a b c"


def test_whitespace_set_is_exactly_what_str_isspace_accepts():
    listed = {c for a, b in K.WHITESPACE_RANGES for c in range(a, b + 1)}
    assert listed == {c for c in range(0x110000) if chr(c).isspace()}
