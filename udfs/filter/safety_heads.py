"""Pluggable safety heads (`punsafe`, `pwatermark`): a small linear or MLP classifier applied to the
L2-normalised CLIP image embedding, giving one probability per row.

LAION computed `punsafe` with a CLIP-embedding NSFW classifier and `pwatermark` with a watermark
classifier. Neither set of weights can be downloaded here, so the filter takes a head from a path
(config `filter.punsafe_head` / `filter.pwatermark_head`, local or s3:// via fsio) and leaves the
column null when none is configured: a missing head never becomes a made-up number.

Head formats (the forward pass runs in numpy, so scoring needs no torch):
- `.npz`: arrays `layer0.weight` (out, in), `layer0.bias` (out,), `layer1.weight`, ... (torch's
  nn.Linear layout), optional `activation` (0-d string: "relu" (default), "gelu", "tanh") applied
  between layers, optional `positive_index` (0-d int, for a 2-class softmax output).
- `.pt` / `.pth` / `.bin`: a torch state dict of an `nn.Sequential` of `nn.Linear` layers (keys such as
  `0.weight`, `0.bias`, `2.weight`, ... or `fc1.weight`, ...); the 2-D `*.weight` tensors, in the
  dict's order, are the layers; activations between them are ReLU unless `activation` is given.
  Loaded with `torch.load(weights_only=True)` (no pickled code runs).
The last layer has 1 output (probability = sigmoid) or 2 outputs (probability = softmax[positive_index],
default 1). The first layer's input size must equal the CLIP embedding dimension.

tests/fixtures/safety_head/make_heads.py writes the tiny heads the tests use.
"""

from __future__ import annotations

import functools
import io
import json
import logging
from dataclasses import dataclass

import numpy as np

from udfs import fsio

log = logging.getLogger(__name__)

ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
    "gelu": lambda x: 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3))),
}


class HeadLoadError(ValueError):
    """A safety head that is missing, unreadable, or not a stack of linear layers."""


@dataclass(frozen=True)
class SafetyHead:
    weights: tuple[np.ndarray, ...]   # (out, in) float32 per layer
    biases: tuple[np.ndarray, ...]    # (out,) float32 per layer
    activation: str = "relu"
    positive_index: int = 1
    source: str = ""

    @property
    def input_dim(self) -> int:
        return int(self.weights[0].shape[1])

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """Probabilities (float64, shape [n]) for image embeddings of shape [n, input_dim]."""
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"safety head {self.source or ''} expects embeddings of dimension "
                             f"{self.input_dim}, got shape {tuple(x.shape)}")
        act = ACTIVATIONS[self.activation]
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = x @ w.T + b
            if i < len(self.weights) - 1:
                x = act(x)
        x = x.astype(np.float64)
        if x.shape[1] == 1:
            return 1.0 / (1.0 + np.exp(-x[:, 0]))
        x = x - x.max(axis=1, keepdims=True)
        e = np.exp(x)
        return e[:, self.positive_index] / e.sum(axis=1)


def _check(weights: list[np.ndarray], biases: list[np.ndarray], activation: str,
           positive_index: int, source: str) -> SafetyHead:
    if not weights:
        raise HeadLoadError(f"safety head {source} has no linear layers")
    if activation not in ACTIVATIONS:
        raise HeadLoadError(f"safety head {source}: unknown activation {activation!r} "
                            f"(choose {', '.join(ACTIVATIONS)})")
    for i, (w, b) in enumerate(zip(weights, biases)):
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise HeadLoadError(f"safety head {source}: layer {i} has weight {w.shape} and bias "
                                f"{b.shape}; expected (out, in) and (out,)")
        if i and w.shape[1] != weights[i - 1].shape[0]:
            raise HeadLoadError(f"safety head {source}: layer {i} takes {w.shape[1]} inputs but "
                                f"layer {i - 1} gives {weights[i - 1].shape[0]}")
    out = weights[-1].shape[0]
    if out not in (1, 2):
        raise HeadLoadError(f"safety head {source}: last layer has {out} outputs; expected 1 "
                            "(sigmoid) or 2 (softmax)")
    if out == 2 and positive_index not in (0, 1):
        raise HeadLoadError(f"safety head {source}: positive_index must be 0 or 1")
    return SafetyHead(tuple(w.astype(np.float32) for w in weights),
                      tuple(b.astype(np.float32) for b in biases),
                      activation, int(positive_index), source)


def _from_npz(data: bytes, source: str) -> SafetyHead:
    try:
        arrays = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises several types for corrupt files
        raise HeadLoadError(f"safety head {source} is not a readable .npz: {exc}") from exc
    weights, biases = [], []
    i = 0
    while f"layer{i}.weight" in arrays:
        weights.append(arrays[f"layer{i}.weight"])
        if f"layer{i}.bias" not in arrays:
            raise HeadLoadError(f"safety head {source}: layer{i}.bias is missing")
        biases.append(arrays[f"layer{i}.bias"])
        i += 1
    activation = str(arrays["activation"]) if "activation" in arrays else "relu"
    positive = int(arrays["positive_index"]) if "positive_index" in arrays else 1
    return _check(weights, biases, activation, positive, source)


def _from_torch(data: bytes, source: str, activation: str) -> SafetyHead:
    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for corrupt files
        raise HeadLoadError(f"safety head {source} is not a readable torch state dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise HeadLoadError(f"safety head {source}: expected a state dict, got {type(state).__name__}")
    weights, biases = [], []
    for key, tensor in state.items():
        if key.endswith(".weight") and getattr(tensor, "ndim", 0) == 2:
            bias_key = key[: -len("weight")] + "bias"
            if bias_key not in state:
                raise HeadLoadError(f"safety head {source}: {bias_key} is missing")
            weights.append(tensor.float().numpy())
            biases.append(state[bias_key].float().numpy())
    return _check(weights, biases, activation, 1, source)


def load_head(uri: str, activation: str = "relu", storage_options: dict | None = None) -> SafetyHead:
    """Load a head from a local path or URI (format by extension; see the module docstring)."""
    if not fsio.exists(uri, storage_options):
        raise HeadLoadError(f"safety head not found: {uri}")
    with fsio.open_uri(uri, "rb", storage_options) as fh:
        data = fh.read()
    lower = str(uri).lower()
    if lower.endswith(".npz"):
        return _from_npz(data, uri)
    if lower.endswith((".pt", ".pth", ".bin")):
        return _from_torch(data, uri, activation)
    raise HeadLoadError(f"safety head {uri}: unknown format (use .npz or a torch .pt/.pth state dict)")


@functools.lru_cache(maxsize=8)
def _cached(uri: str, options_json: str) -> SafetyHead:
    log.info("loading safety head %s", uri)
    return load_head(uri, storage_options=json.loads(options_json) or None)


def get_head(uri: str | None, storage_options: dict | None = None) -> SafetyHead | None:
    """The head at `uri`, loaded once per Python worker; None when no head is configured."""
    if not uri:
        return None
    return _cached(str(uri), json.dumps(storage_options or {}, sort_keys=True))


def score(uri: str | None, embeddings: np.ndarray,
          storage_options: dict | None = None) -> np.ndarray | None:
    """Probabilities from the head at `uri`, or None (the column stays null) when `uri` is None."""
    head = get_head(uri, storage_options)
    return None if head is None else head.predict(embeddings)
