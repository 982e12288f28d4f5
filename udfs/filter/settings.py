"""The filter stage's settings, checked on the driver before any task: thresholds (or a preset),
the language detector and its cut-off, the safety heads, the subset names, SemDeDup and the eval
set. The result is the small picklable dict the workers get.
"""

from __future__ import annotations

from udfs.filter import langid, safety_heads
from udfs.filter.subset_filter import BUCKETS
from udfs.image_dedup.layers import EvalSetError, load_eval_set


class SettingsError(ValueError):
    """A filter setting the user must fix; the stage reports it as a configuration error."""


def resolve_thresholds(section: dict) -> dict[str, float]:
    """Per-bucket thresholds: `filter.thresholds`, or all three from `filter.presets[preset]` when
    `filter.preset` is set (a preset is an explicit choice, so it wins; `filter.thresholds` keeps
    holding the thresholds of the default run, which is what other readers of the config see)."""
    preset_name = section.get("preset")
    presets = section.get("presets") or {}
    if preset_name is not None:
        if preset_name not in presets:
            raise SettingsError(f"filter.preset {preset_name!r} is not in filter.presets "
                              f"({', '.join(presets) or 'none defined'})")
        source, values = f"filter.presets.{preset_name}", presets[preset_name] or {}
    else:
        source, values = "filter.thresholds", section.get("thresholds") or {}
    unknown = set(values) - set(BUCKETS)
    if unknown:
        raise SettingsError(f"{source} has unknown buckets {sorted(unknown)}; use {', '.join(BUCKETS)}")
    out = {}
    for bucket in BUCKETS:
        value = values.get(bucket)
        if value is None:
            raise SettingsError(f"{source}.{bucket} is not set")
        try:
            out[bucket] = float(value)
        except (TypeError, ValueError) as exc:
            raise SettingsError(f"{source}.{bucket} must be a number, got {value!r}") from exc
        if not -1.0 <= out[bucket] <= 1.0:
            raise SettingsError(f"{source}.{bucket} is a cosine similarity in [-1, 1], got {value!r}")
    return out


def build_settings(section: dict, storage_options: dict | None, phash_distance: int) -> dict:
    """Everything the worker functions need, as a small picklable dict (checked on the driver).
    `section`: the filter config section; `phash_distance`: image_dedup.phash_distance."""
    if section.get("language_detector") not in langid.DETECTORS:
        raise SettingsError(f"filter.language_detector must be one of {', '.join(langid.DETECTORS)}, "
                          f"got {section.get('language_detector')!r}")
    try:
        # Built once here so a bad code, a missing gcld3 or a broken head fails before any task.
        detector = langid.get_detector(section["language_detector"], section.get("min_language_confidence"),
                                       section.get("languages"))
        heads = {k: safety_heads.get_head(section.get(k), storage_options)
                 for k in ("punsafe_head", "pwatermark_head")}
    except (langid.LanguageIdError, safety_heads.HeadLoadError) as exc:
        raise SettingsError(str(exc)) from exc
    subsets = section.get("subsets") or {}
    if set(subsets) != set(BUCKETS) or len(set(subsets.values())) != 3:
        raise SettingsError("filter.subsets needs three distinct names for en, multi and nolang")
    return {
        "thresholds": resolve_thresholds(section),
        "detector": section["language_detector"],
        "min_language_confidence": detector.min_confidence,
        "min_language_confidence_source": ("filter.min_language_confidence"
                                           if section.get("min_language_confidence") is not None
                                           else f"{detector.name} default (udfs.filter.langid.DEFAULT_CUTOFFS)"),
        "languages": list(section["languages"]) if section.get("languages") else None,
        "punsafe_head": section.get("punsafe_head"),
        "pwatermark_head": section.get("pwatermark_head"),
        "head_dims": {k: h.input_dim for k, h in heads.items() if h is not None},
        "storage_options": storage_options,
        "subsets": dict(subsets),
        "embeddings_per_file": int(section["embeddings_per_file"]),
        "histogram": dict(section["histogram"]),
        **hygiene_settings(section, storage_options, phash_distance),
    }


def hygiene_settings(section: dict, storage_options: dict | None, phash_distance: int) -> dict:
    """filter.semdedup and the eval set, checked on the driver (the eval set is loaded once here,
    so a bad folder fails before any task)."""
    sd = dict(section.get("semdedup") or {})
    if sd.get("scope") not in ("subset", "global"):
        raise SettingsError(f"filter.semdedup.scope must be subset or global, got {sd.get('scope')!r}")
    if not 0.0 < float(sd.get("eps", 0)) < 1.0:
        raise SettingsError(f"filter.semdedup.eps must be in (0, 1), got {sd.get('eps')!r}")
    if int(sd.get("clusters") or 0) < 1:
        raise SettingsError("filter.semdedup.clusters must be >= 1")
    eval_uri = section.get("eval_images")
    eval_items = 0
    if eval_uri:
        try:
            eval_items = len(load_eval_set(eval_uri, storage_options))
        except EvalSetError as exc:
            raise SettingsError(str(exc)) from exc
    cosine = float(section.get("eval_cosine"))
    if not -1.0 <= cosine <= 1.0:
        raise SettingsError(f"filter.eval_cosine is a cosine in [-1, 1], got {cosine}")
    return {"semdedup": sd, "eval_images": eval_uri, "eval_items": eval_items, "eval_cosine": cosine,
            "eval_phash_distance": int(phash_distance)}
