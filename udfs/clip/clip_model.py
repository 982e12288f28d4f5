"""The CLIP model API of clipcrawl (contract 6): load an open_clip model once, embed images and
texts as L2-normalised float32 vectors.

    clip = load_clip("ViT-B-32", "laion2b_s34b_b79k")                 # tag (needs internet)
    clip = load_clip("ViT-B-32", "s3://bucket/ckpt/vit-b-32.pt")      # checkpoint via fsio
    clip = load_clip("local-dir:tests/fixtures/tiny_clip", None)      # open_clip local folder
    clip.encode_images([pil, ...]), clip.encode_texts(["a red circle"]) -> np.ndarray [n, dim]

Why a wrapper and not open_clip directly: the stage needs (a) one model per Python worker, built in
the worker (`cached_clip`), never pickled from the driver; (b) device choice that honours the GPU
Spark assigned to the task (`select_device`); (c) fp16 autocast on CUDA only; and (d) clear
`ModelLoadError`s. open_clip itself silently falls back to random weights when a local-dir has no
checkpoint, and reports an unknown name or a corrupt file with generic RuntimeErrors.

No pyspark here; torch and open_clip are imported inside functions (once per worker).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from udfs import fsio

log = logging.getLogger(__name__)

LOCAL_DIR = "local-dir:"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_REPO_ROOT = Path(__file__).resolve().parents[2]   # udfs/clip/clip_model.py -> the repository


class ModelLoadError(ValueError):
    """The configured model cannot be built: unknown name, missing or corrupt checkpoint, bad device."""


# --- device and precision ---------------------------------------------------------------------------

def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def select_device(requested: str = "auto", gpu_addresses: Sequence[str] | None = None,
                  has_cuda: bool | None = None) -> str:
    """The torch device string for a worker.

    `auto` means CUDA when the process sees a GPU, else CPU. `gpu_addresses` are the GPUs Spark
    assigned to the task (TaskContext resources, set by the GPU profiles); the first one is used so
    that tasks sharing an executor with several GPUs do not all land on cuda:0.
    """
    requested = (requested or "auto").lower()
    base = requested.split(":", 1)[0]
    if base not in DEVICES:
        raise ModelLoadError(f"unknown device {requested!r}; choose one of {', '.join(DEVICES)}")
    if has_cuda is None:
        has_cuda = cuda_available()
    if base == "cpu":
        return "cpu"
    if not has_cuda:
        if base == "cuda":
            raise ModelLoadError("device 'cuda' requested but CUDA is not available in this worker")
        return "cpu"
    if ":" in requested:
        return requested
    if gpu_addresses:
        return f"cuda:{str(gpu_addresses[0]).strip()}"
    return "cuda"


def resolve_precision(precision: str, device: str) -> str:
    """auto: fp16 autocast on CUDA (the speed LAION's scoring relied on), fp32 on CPU."""
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    on_cuda = device.startswith("cuda")
    if precision == "auto":
        return "fp16" if on_cuda else "fp32"
    if precision == "fp16" and not on_cuda:
        raise ModelLoadError("precision fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    return precision


# --- model spec resolution ----------------------------------------------------------------------------

def resolve_local_dir(path: str) -> str:
    """A local-dir path as given, or relative to the repository root (workers may run elsewhere)."""
    p = Path(path).expanduser()
    if p.is_dir() or p.is_absolute():
        return str(p)
    candidate = _REPO_ROOT / p
    return str(candidate) if candidate.is_dir() else str(p)


def _is_tag(model: str, pretrained: str) -> bool:
    import open_clip

    return bool(open_clip.get_pretrained_cfg(model.replace("/", "-"), pretrained))


def check_model_spec(model: str, pretrained: str | None,
                     storage_options: dict | None = None) -> dict[str, Any]:
    """Validate a model spec without building the model (cheap; run on the driver to fail fast).

    Returns a normalised spec {model, pretrained, kind} with local-dir paths made absolute, so that
    workers started in another directory find the same folder.
    """
    import open_clip

    if not model:
        raise ModelLoadError("no CLIP model configured (clip.model is empty)")
    if model.startswith(LOCAL_DIR):
        folder = model[len(LOCAL_DIR):]
        if fsio.is_remote(folder):  # fetched to a local temp folder by load_clip
            return {"model": LOCAL_DIR + folder, "pretrained": None, "kind": "local-dir"}
        folder = resolve_local_dir(folder)
        p = Path(folder)
        if not p.is_dir():
            raise ModelLoadError(f"local-dir model folder not found: {folder}")
        if not (p / "open_clip_config.json").is_file():
            raise ModelLoadError(f"local-dir model folder {folder} has no open_clip_config.json")
        if not any(f.suffix in _WEIGHT_SUFFIXES for f in p.iterdir()):
            raise ModelLoadError(f"local-dir model folder {folder} holds no weights "
                                 f"(*.safetensors, *.bin, *.pth); open_clip would use random weights")
        if pretrained:
            log.warning("clip.pretrained=%s is ignored for a local-dir model", pretrained)
        return {"model": LOCAL_DIR + str(p.resolve()), "pretrained": None, "kind": "local-dir"}
    if model.startswith("hf-hub:"):
        return {"model": model, "pretrained": pretrained, "kind": "hf-hub"}
    name = model.replace("/", "-")
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelLoadError(f"unknown open_clip model name {model!r}{hint}")
    if not pretrained:
        return {"model": name, "pretrained": None, "kind": "random-init"}
    if _is_tag(name, pretrained):
        return {"model": name, "pretrained": pretrained, "kind": "tag"}
    if fsio.is_remote(pretrained):
        if not fsio.exists(pretrained, storage_options):
            raise ModelLoadError(f"checkpoint not found: {pretrained}")
        return {"model": name, "pretrained": pretrained, "kind": "remote-checkpoint"}
    path = Path(pretrained).expanduser()
    if not path.is_file():
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ModelLoadError(f"checkpoint not found: {pretrained} (not a file, and not a pretrained "
                             f"tag of {name}; known tags: {tags})")
    return {"model": name, "pretrained": str(path.resolve()), "kind": "checkpoint"}


def _fetch_remote(uri: str, storage_options: dict | None = None) -> str:
    """Copy a remote checkpoint (s3://...) to a per-machine temp file once; reuse it after."""
    digest = hashlib.sha1(uri.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "clipcrawl-checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{digest}-{os.path.basename(uri.rstrip('/'))}"
    if target.exists():
        return str(target)
    tmp = target.with_name(target.name + f".{os.getpid()}.part")
    with fsio.open_uri(uri, "rb", storage_options) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    os.replace(tmp, target)
    log.info("fetched checkpoint %s to %s", uri, target)
    return str(target)


def _fetch_remote_dir(uri: str, storage_options: dict | None = None) -> str:
    fs, path = fsio.filesystem(uri, storage_options)
    digest = hashlib.sha1(uri.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "clipcrawl-checkpoints" / f"{digest}-dir"
    if not (folder / "open_clip_config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for entry in fs.ls(path, detail=False):
            name = os.path.basename(entry.rstrip("/"))
            if name == "open_clip_config.json" or name.endswith(_WEIGHT_SUFFIXES) or name.startswith("tokenizer"):
                fs.get(entry, str(folder / name))
    return str(folder)


# --- the model ----------------------------------------------------------------------------------------

class ClipModel:
    """An open_clip model on one device, with its preprocessing and tokenizer."""

    def __init__(self, model, preprocess, tokenizer, device: str, precision: str, name: str):
        self.model = model
        self._preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        self.name = name
        self.dim = int(self.encode_texts(["a"]).shape[1])

    def __repr__(self) -> str:
        return f"ClipModel({self.name}, device={self.device}, precision={self.precision}, dim={self.dim})"

    def _autocast(self):
        import torch

        if self.precision == "fp16":
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def preprocess(self, img):
        """PIL image -> CHW float tensor (resize, crop, normalise as the model was trained)."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        return self._preprocess(img)

    def _finish(self, feats) -> np.ndarray:
        import torch

        feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy().astype(np.float32, copy=False)

    def encode_image_tensors(self, batch) -> np.ndarray:
        """A preprocessed batch [n, 3, H, W] -> normalised embeddings [n, dim]."""
        import torch

        if batch is None or len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode(), self._autocast():
            feats = self.model.encode_image(batch.to(self.device, non_blocking=True))
        return self._finish(feats)

    def encode_images(self, images: Sequence) -> np.ndarray:
        import torch

        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_image_tensors(torch.stack([self.preprocess(i) for i in images]))

    def tokenize(self, texts: Sequence[str]):
        return self.tokenizer([t if t is not None else "" for t in texts])

    def encode_token_tensors(self, tokens) -> np.ndarray:
        import torch

        with torch.inference_mode(), self._autocast():
            feats = self.model.encode_text(tokens.to(self.device, non_blocking=True))
        return self._finish(feats)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        return self.encode_token_tensors(self.tokenize(list(texts)))


def load_clip(model: str, pretrained: str | None, device: str = "auto", precision: str = "auto",
              gpu_addresses: Sequence[str] | None = None, storage_options: dict | None = None) -> ClipModel:
    """Build an open_clip model for inference. Raises ModelLoadError with a clear message when
    the name is unknown or the checkpoint is missing, corrupt or for another architecture."""
    import open_clip

    spec = check_model_spec(model, pretrained, storage_options)
    dev = select_device(device, gpu_addresses)
    prec = resolve_precision(precision, dev)
    name, weights = spec["model"], spec["pretrained"]
    if spec["kind"] == "local-dir" and fsio.is_remote(name[len(LOCAL_DIR):]):
        name = LOCAL_DIR + _fetch_remote_dir(name[len(LOCAL_DIR):], storage_options)
    elif spec["kind"] == "remote-checkpoint":
        weights = _fetch_remote(weights, storage_options)
    elif spec["kind"] == "random-init":
        log.warning("CLIP model %s has no pretrained weights: random initialisation, similarities are "
                    "meaningless (only useful for benchmarks)", name)
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=dev)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:  # noqa: BLE001 - open_clip/torch/safetensors raise many types
        what = weights or name
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load CLIP model {model!r} (weights {what}): corrupt checkpoint "
                             f"or one for another architecture: {type(exc).__name__}: {first[:300]}") from exc
    net.eval()
    log.info("loaded CLIP %s (%s) on %s, precision %s", model, spec["kind"], dev, prec)
    return ClipModel(net, preprocess, tokenizer, dev, prec, model)


_CACHE: dict[tuple, ClipModel] = {}
_CACHE_LOCK = threading.Lock()


def cached_clip(model: str, pretrained: str | None, device: str = "auto", precision: str = "auto",
                gpu_addresses: Sequence[str] | None = None, storage_options: dict | None = None) -> ClipModel:
    """`load_clip` once per Python worker process and model config (Spark reuses workers across
    tasks, so later partitions skip the load)."""
    key = (model, pretrained, device, precision, tuple(gpu_addresses or ()))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load_clip(model, pretrained, device, precision, gpu_addresses, storage_options)
        return _CACHE[key]


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
