"""Configuration: `conf/base.yaml`, then a profile, then `--config FILE|PRESET`, then `--set key=value`.

The files are package resources (`conf_dir`): the same loading works from a checkout, an
installed wheel or a `--py-files` zip, from any working directory.

One resolved, read-only mapping is built once by the CLI and handed to every stage; nothing
reads config at import time or from environment variables. Overrides of unknown keys are
rejected so that a typo (`--set download.thread_cont=8`) fails loudly instead of being ignored.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

PROFILES = ("local", "emr", "dataproc", "databricks", "standalone")

# Sections whose keys are free-form (their keys may themselves contain dots).
FREEFORM_SECTIONS = ("spark.conf", "storage.storage_options")


class ConfigError(ValueError):
    """A configuration problem the user can fix (unknown key, bad value, missing profile)."""


def conf_dir():
    """The folder holding base.yaml, the profiles and presets/, as an `importlib.resources`
    Traversable: the source tree's `conf/` beside the package (a checkout), else the copy packaged
    as `spark_jobs.conf` inside a wheel or a `--py-files` zip. Read it with `.read_text()`, never
    `open(path)`: inside a zip there is no path."""
    from importlib import resources

    source_tree = Path(__file__).resolve().parent.parent / "conf"
    if (source_tree / "base.yaml").is_file():
        return source_tree
    try:
        packaged = resources.files("spark_jobs.conf")
    except ModuleNotFoundError:
        packaged = None
    if packaged is not None and (packaged / "base.yaml").is_file():
        return packaged
    raise ConfigError(f"cannot find conf/base.yaml (looked in {source_tree} and in the spark_jobs.conf "
                      f"package resources{' at ' + str(packaged) if packaged is not None else ''})")


def presets() -> list[str]:
    """Names of the packaged presets (conf/presets/<name>.yaml), usable as `--config <name>`."""
    folder = conf_dir() / "presets"
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def packaged_preset(name: str):
    """The packaged preset that `--config NAME` means, or None: a bare name (`tiny_clip`) or the
    source tree's spelling (`conf/presets/tiny_clip.yaml`), so README commands also work where only
    the wheel or the zip is installed."""
    text = str(name).replace("\\", "/")
    stem = text[:-5] if text.endswith(".yaml") else text
    if "/" in stem:
        head, stem = stem.rsplit("/", 1)
        if not head.endswith("presets"):
            return None
    if not stem:
        return None
    candidate = conf_dir() / "presets" / f"{stem}.yaml"
    return candidate if candidate.is_file() else None


def _deep_merge(base: dict, override: Mapping) -> dict:
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _load_yaml(path) -> dict:
    """A YAML mapping from a user's file (path) or a packaged resource (Traversable)."""
    try:
        if isinstance(path, (str, Path)):
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        else:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3). The value is YAML, so numbers, booleans and lists keep their type."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _apply_override(tree: dict, key: str, value: Any) -> None:
    for section in FREEFORM_SECTIONS:
        if key.startswith(section + "."):
            node = tree
            for part in section.split("."):
                node = node.setdefault(part, {})
            node[key[len(section) + 1:]] = value
            return
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"unknown config key {key!r} (no section {'.'.join(parts[:i + 1])!r})")
        node = node[part]
        if node is None:  # a section left null in YAML, e.g. `presets:` with no entries
            raise ConfigError(f"config key {key!r}: {'.'.join(parts[:i + 1])} is not a section")
    if not isinstance(node, dict) or parts[-1] not in node:
        raise ConfigError(f"unknown config key {key!r}")
    node[parts[-1]] = value


class Config(Mapping):
    """Read-only nested configuration with dotted lookups: `cfg.get("download.image_size")`."""

    def __init__(self, tree: dict, profile: str):
        self._tree = tree
        self.profile = profile

    def __getitem__(self, key: str) -> Any:
        return self._tree[key]

    def __iter__(self):
        return iter(self._tree)

    def __len__(self) -> int:
        return len(self._tree)

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self._tree
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    def section(self, name: str) -> dict:
        """A deep copy of one section, safe to pass to worker closures (it pickles small)."""
        value = self.get(name)
        if not isinstance(value, Mapping):
            raise ConfigError(f"config has no section {name!r}")
        return copy.deepcopy(dict(value))

    def with_overrides(self, overrides: Iterable[str]) -> "Config":
        tree = copy.deepcopy(self._tree)
        for item in overrides:
            _apply_override(tree, *parse_override(item))
        return Config(tree, self.profile)

    def to_dict(self) -> dict:
        return copy.deepcopy(self._tree)


def load_config(profile: str = "local", config_file: str | None = None,
                overrides: Iterable[str] = ()) -> Config:
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    folder = conf_dir()
    tree = _load_yaml(folder / "base.yaml")
    _deep_merge(tree, _load_yaml(folder / f"{profile}.yaml"))
    if config_file:
        preset = None if Path(config_file).is_file() else packaged_preset(config_file)
        user = _load_yaml(preset if preset is not None else config_file)
        # A user file may only set keys the base config knows (free-form sections excepted).
        for key, value in _flatten(user):
            _apply_override(tree, key, value)
    return Config(tree, profile).with_overrides(overrides)


def _flatten(tree: Mapping, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted in FREEFORM_SECTIONS and isinstance(value, Mapping):
            for sub, subval in value.items():
                yield f"{dotted}.{sub}", subval
        elif isinstance(value, Mapping) and value:
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value
