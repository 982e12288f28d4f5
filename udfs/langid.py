"""Caption language detection behind one small interface, for the filter's language split.

`get_detector(name, min_confidence, languages)` returns a `LanguageDetector` whose
`detect_batch(texts)` gives one `(code, confidence)` per text: `code` is an ISO 639-1 code
("en", "de", ... as LAION's `LANGUAGE` column) or None when the best guess is below
`min_confidence` ("no language": file names, product codes, numbers). `confidence` is the
detector's own score of its best guess (0.0 for empty text), kept even when the code is None.

Detectors (config `filter.language_detector`):
- `cld3`: Google's CLD3 through the `gcld3` binding, the detector LAION used. No wheels: it builds
  from source against protobuf (`apt-get install protobuf-compiler libprotobuf-dev`, then
  `pip install gcld3`; optional, not in requirements.txt). Codes as CLD3 returns them, incl.
  romanised forms ("ja-Latn"); "und" is no language.
- `lingua`: lingua-language-detector, models inside its wheel, high-accuracy mode.
- `lingua-low`: lingua's low-accuracy mode (trigrams only, smaller and faster).
With `filter.languages` set (a list of ISO 639-1 codes) lingua only chooses among those; CLD3
cannot be restricted.

Measured by `python bench/bench_langid.py` on tests/fixtures/captions_multilingual.tsv (155
captions in 14 languages + 25 no-language strings), 2-core VM shared with other jobs (speeds are
noisy, ratios less so), 2026-11-21. Accuracy at each detector's best cut-off; warm captions/s on
one thread; cold start and peak RSS of a fresh process (what each Spark Python worker pays):
    lingua (all 75 languages)        0.944 @0.20    ~1,800/s   8-20 s   1,070 MB
    lingua, 30 common web languages  0.966 @0.20    ~5,900/s   ~8 s       560 MB
    lingua-low (all)                 0.898 @0.30   ~11,000/s   ~1 s        85 MB
    lingua-low, 30 languages         0.938 @0.45   ~25,000/s   <1 s        51 MB
    cld3 (gcld3 3.0.13, LAION's)     0.797 @0.80   ~48,000/s   <0.1 s      17 MB
CLD3's no-language recall is 0.56: it calls "12345" Japanese and "DSC 0042" Frisian, reliably.
Default: `lingua`, all languages, `min_language_confidence: 0.2`: the most accurate choice that
does not force captions of unlisted languages into a wrong one; 1,800 captions/s per core is
small next to CLIP scoring. Its cost is memory: ~1.1 GB per Python worker (size the executors'
Python memory for it, e.g. spark.executor.pyspark.memory), or choose `lingua-low` (85 MB, 5 points
less accurate here). Lingua's confidences are relative over its candidate languages, so the
cut-off must be re-tuned when `filter.languages` or the detector changes (the bench sweeps it).

Building a detector loads its models (lingua: 8-20 s for all languages here), so it is built
once per Python worker and cached here (`get_detector` is memoised); detectors are never pickled
from the driver.
"""

from __future__ import annotations

import functools
import logging
from typing import Iterable, Protocol, Sequence

log = logging.getLogger(__name__)

DETECTORS = ("lingua", "lingua-low", "cld3")


class LanguageDetector(Protocol):
    name: str
    min_confidence: float

    def detect_batch(self, texts: Sequence[str | None]) -> list[tuple[str | None, float]]:
        ...


class LanguageIdError(ValueError):
    """A detector that is unknown, not installed, or given an unknown language code."""


def _cut(code: str | None, confidence: float, min_confidence: float) -> tuple[str | None, float]:
    confidence = float(confidence)
    if code is None or confidence < min_confidence:
        return None, confidence
    return code, confidence


def _each_text(texts: Sequence[str | None], detect_one) -> list[tuple[str | None, float]]:
    """Blank or missing captions have no language; the others go to the detector one by one."""
    return [(None, 0.0) if not text or not text.strip() else detect_one(text) for text in texts]


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
    """CLD3 via gcld3: a small neural net over character n-grams; `probability` is its confidence."""

    def __init__(self, min_confidence: float, max_num_bytes: int = 1000):
        try:
            import gcld3
        except ImportError as exc:
            raise LanguageIdError(
                "language_detector 'cld3' needs the gcld3 package, which builds from source: "
                "apt-get install protobuf-compiler libprotobuf-dev && pip install gcld3 "
                "or use filter.language_detector=lingua") from exc
        self.name = "cld3"
        self.min_confidence = float(min_confidence)
        self._detector = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=max_num_bytes)

    def detect_batch(self, texts: Sequence[str | None]) -> list[tuple[str | None, float]]:
        return _each_text(texts, self._detect_one)

    def _detect_one(self, text: str) -> tuple[str | None, float]:
        result = self._detector.FindLanguage(text=text)
        code = result.language if result.language and result.language != "und" else None
        return _cut(code, result.probability, self.min_confidence)


def build_detector(name: str, min_confidence: float,
                   languages: Iterable[str] | None = None) -> LanguageDetector:
    """A new detector (loads models). Prefer `get_detector`, which caches one per worker."""
    if name == "lingua":
        return LinguaDetector(min_confidence, languages)
    if name == "lingua-low":
        return LinguaDetector(min_confidence, languages, low_accuracy=True)
    if name == "cld3":
        if languages:
            log.warning("cld3 cannot be restricted to filter.languages; ignoring the list")
        return Cld3Detector(min_confidence)
    raise LanguageIdError(f"unknown language detector {name!r}; choose one of {', '.join(DETECTORS)}")


@functools.lru_cache(maxsize=4)
def _cached(name: str, min_confidence: float, languages: tuple[str, ...] | None) -> LanguageDetector:
    log.info("building language detector %s (min_confidence=%s, languages=%s)",
             name, min_confidence, ",".join(languages) if languages else "all")
    return build_detector(name, min_confidence, languages)


def get_detector(name: str, min_confidence: float,
                 languages: Iterable[str] | None = None) -> LanguageDetector:
    """The detector for these settings, built once per Python process (Spark worker) and reused."""
    key = tuple(sorted(str(c).lower() for c in languages)) if languages else None
    return _cached(name, float(min_confidence), key)


def available_detectors() -> list[str]:
    """Detectors that can be built in this environment (cld3 only when gcld3 is installed)."""
    names = ["lingua", "lingua-low"]
    try:
        import gcld3  # noqa: F401
        names.append("cld3")
    except ImportError:
        pass
    return names
