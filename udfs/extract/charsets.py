"""The character set of an HTML page, in the order the issue asks for: HTTP header, BOM,
`<meta charset>` / `<meta http-equiv>`, then detection (charset-normalizer) for legacy pages.

The first declared charset that decodes every byte is used; when none does, the first declared one
with U+FFFD (a browser does the same). Only an undeclared page goes to detection, after strict
UTF-8, which is cheap, exact for ASCII and rarely decodes a legacy multi-byte page by accident. Labels are mapped the way
browsers do (WHATWG): `iso-8859-1`/`ascii` mean windows-1252, `gb2312`/`gbk` mean GB18030,
`shift_jis` means windows-31j, `euc-kr` means windows-949.
"""

from __future__ import annotations

import codecs
import re
from typing import NamedTuple

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)
_CT_CHARSET = re.compile(r"charset\s*=\s*[\"']?([A-Za-z0-9_.:-]+)", re.I)
META_SCAN = 4096          # bytes scanned for a <meta> charset (browsers: 1024; some pages are late)
DETECT_BYTES = 32 << 10   # bytes given to the detector (enough for a verdict, bounded cost)

# WHATWG encoding labels whose browser meaning differs from Python's codec of the same name.
_WHATWG = {
    "iso-8859-1": "cp1252", "iso8859-1": "cp1252", "latin1": "cp1252", "latin-1": "cp1252",
    "l1": "cp1252", "ascii": "cp1252", "us-ascii": "cp1252", "windows-1252": "cp1252",
    "iso-8859-9": "cp1254", "latin5": "cp1254",
    "gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "gb_2312-80": "gb18030",
    "chinese": "gb18030", "csgb2312": "gb18030",
    "shift_jis": "cp932", "shift-jis": "cp932", "sjis": "cp932", "x-sjis": "cp932",
    "ms_kanji": "cp932", "windows-31j": "cp932",
    "euc-kr": "cp949", "ks_c_5601-1987": "cp949", "x-euc-jp": "euc_jp",
    "big5": "big5hkscs", "big5-hkscs": "big5hkscs", "x-mac-roman": "mac_roman",
    "tis-620": "cp874", "iso-8859-11": "cp874",
}
# The legacy charsets detection may answer (charset-normalizer otherwise also considers codecs no
# web page uses, such as cp1006, and picks them for short samples).
LEGACY_WEB = ("euc_jp", "cp932", "shift_jis", "iso2022_jp", "gb18030", "gb2312", "big5", "big5hkscs",
              "euc_kr", "cp949", "cp1250", "cp1251", "cp1252", "cp1253", "cp1254", "cp1255",
              "cp1256", "cp1257", "cp1258", "koi8_r", "koi8_u", "cp874", "iso8859_2", "iso8859_5",
              "iso8859_7", "iso8859_15", "mac_cyrillic", "utf_16")
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))


class Decoded(NamedTuple):
    text: str
    codec: str
    source: str        # header | bom | meta | utf8 | detected | fallback
    lossy: bool        # some bytes did not decode (U+FFFD)


def codec_for(label: str | None) -> str | None:
    """Python codec name for a charset label, None when unknown."""
    if not label:
        return None
    label = label.strip().strip("\"'").lower()
    label = _WHATWG.get(label, label)
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


def header_charset(content_type: str | None) -> str | None:
    if not content_type:
        return None
    m = _CT_CHARSET.search(content_type)
    return m.group(1) if m else None


def meta_charset(body: bytes) -> str | None:
    m = _META_CHARSET.search(body, 0, META_SCAN)
    return m.group(1).decode("ascii", "replace") if m else None


def _strict(body: bytes, codec: str) -> str | None:
    try:
        return body.decode(codec)
    except (UnicodeDecodeError, LookupError):
        return None


def decode_html(body: bytes, content_type: str | None = None) -> Decoded:
    """Text of an HTML body; see the module docstring for the order of the sources."""
    declared = []
    hc = codec_for(header_charset(content_type))
    if hc:
        declared.append((hc, "header"))
    for bom, codec in _BOMS:
        if body.startswith(bom):
            declared.append((codec, "bom"))
            break
    mc = codec_for(meta_charset(body))
    if mc:
        declared.append((mc, "meta"))
    for codec, source in declared:
        text = _strict(body, codec)
        if text is not None:
            return Decoded(text, codec, source, False)
    if declared:
        # a declared charset that does not fit every byte still wins (as in a browser): U+FFFD
        codec, source = declared[0]
        return Decoded(body.decode(codec, "replace"), codec, source, True)
    if b"\x1b$" in body:        # ISO-2022-JP is 7-bit: it would pass for UTF-8
        text = _strict(body, "iso2022_jp")
        if text is not None:
            return Decoded(text, "iso2022_jp", "detected", False)
    text = _strict(body, "utf-8")
    if text is not None:
        return Decoded(text, "utf-8", "utf8", False)
    detected = detect(body)
    if detected:
        text = _strict(body, detected)
        if text is not None:
            return Decoded(text, detected, "detected", False)
        return Decoded(body.decode(detected, "replace"), detected, "detected", True)
    return Decoded(body.decode("utf-8", "replace"), "utf-8", "fallback", True)


_KANA = re.compile("[\u3041-\u30ff]")
_NON_ASCII = re.compile("[^\x00-\x7f]")


def _japanese(body: bytes) -> str | None:
    """EUC-JP or Shift_JIS when one decodes the sample and kana make up a good part of its
    non-ASCII text (Japanese prose always has kana; charset-normalizer often answers a Korean or
    Chinese codec for short Japanese pages, whose byte ranges overlap)."""
    sample = body[:DETECT_BYTES]
    for codec in ("euc_jp", "cp932"):
        try:
            text = sample.decode(codec)
        except UnicodeDecodeError:
            try:   # the sample may end inside a character
                text = sample[:-1].decode(codec)
            except UnicodeDecodeError:
                continue
        non_ascii = len(_NON_ASCII.findall(text))
        if non_ascii >= 4 and len(_KANA.findall(text)) >= 0.15 * non_ascii:
            return codec
    return None


_HANGUL = re.compile("[\uac00-\ud7a3]")
_HANZI = re.compile("[\u4e00-\u9fff]")
_KOREAN = frozenset(("cp949", "euc_kr", "johab", "iso2022_kr"))


def _plausible(codec: str, text: str) -> bool:
    """Korean codecs decode much Chinese text too (into a mix of hanja and rare syllables), which
    charset-normalizer sometimes ranks first: a Korean answer needs mostly Hangul and few hanja; a
    Japanese one needs kana."""
    non_ascii = len(_NON_ASCII.findall(text))
    if not non_ascii:
        return True
    if codec in _KOREAN:   # Korean web text is Hangul with almost no hanja
        return (len(_HANGUL.findall(text)) >= 0.6 * non_ascii
                and len(_HANZI.findall(text)) <= 0.1 * non_ascii)
    if codec in ("euc_jp", "cp932", "shift_jis", "euc_jis_2004", "shift_jis_2004"):
        return len(_KANA.findall(text)) >= 0.15 * non_ascii
    return True


def detect(body: bytes) -> str | None:
    """The charset of an undeclared legacy page, as a Python codec name: Japanese by its kana,
    else the first of charset-normalizer's answers (among the legacy web charsets) that is
    plausible for its script."""
    ja = _japanese(body)
    if ja:
        return ja
    try:
        from charset_normalizer import from_bytes
    except ImportError:  # pragma: no cover - a dependency of requests, always present here
        return None
    matches = from_bytes(body[:DETECT_BYTES], cp_isolation=list(LEGACY_WEB))
    first = None
    for match in matches:
        codec = codec_for(match.encoding)
        if codec is None:
            continue
        first = first or codec
        if _plausible(codec, str(match)):
            return codec
    return first
