"""Safety heads: loading both documented formats and scoring CLIP image embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from udfs.filter import safety_heads

HEADS = Path(__file__).resolve().parent / "fixtures" / "safety_head"


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_linear_npz_head_separates_by_direction():
    u = np.load(HEADS / "direction_d32.npy")
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((20, 32)).astype(np.float32)
    noise -= (noise @ u)[:, None] * u            # orthogonal to u
    near = _unit(u + 0.2 * _unit(noise[:10]))     # e . u ~ 0.98
    far = _unit(noise[10:])                       # e . u = 0
    head = safety_heads.load_head(str(HEADS / "linear_d32.npz"))
    assert head.input_dim == 32
    p = head.predict(np.vstack([near, far]))
    assert p.shape == (20,) and p.dtype == np.float64
    assert (p[:10] > 0.9).all() and (p[10:] < 0.01).all()


def test_torch_state_dict_mlp_matches_torch_forward():
    torch = pytest.importorskip("torch")
    state = torch.load(HEADS / "mlp_d32.pt", weights_only=True)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    mlp.load_state_dict(state)
    x = _unit(np.random.default_rng(1).standard_normal((7, 32)).astype(np.float32))
    with torch.no_grad():
        want = torch.softmax(mlp(torch.from_numpy(x)), dim=1)[:, 1].numpy()
    got = safety_heads.load_head(str(HEADS / "mlp_d32.pt")).predict(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_float16_embeddings_and_empty_batch():
    head = safety_heads.load_head(str(HEADS / "linear_d32.npz"))
    assert head.predict(np.zeros((0, 32), np.float16)).shape == (0,)
    x = _unit(np.random.default_rng(2).standard_normal((3, 32))).astype(np.float16)
    np.testing.assert_allclose(head.predict(x), head.predict(x.astype(np.float32)))


def test_no_head_configured_gives_none():
    assert safety_heads.get_head(None) is None
    assert safety_heads.score(None, np.zeros((2, 32), np.float32)) is None


def test_head_is_cached_per_process():
    path = str(HEADS / "linear_d32.npz")
    assert safety_heads.get_head(path) is safety_heads.get_head(path)


def test_clear_errors(tmp_path):
    with pytest.raises(safety_heads.HeadLoadError, match="not found"):
        safety_heads.load_head(str(tmp_path / "missing.npz"))
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip file")
    with pytest.raises(safety_heads.HeadLoadError, match="not a readable"):
        safety_heads.load_head(str(tmp_path / "corrupt.npz"))
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    with pytest.raises(safety_heads.HeadLoadError, match="not a readable"):
        safety_heads.load_head(str(tmp_path / "corrupt.pt"))
    np.savez(tmp_path / "three.npz", **{"layer0.weight": np.ones((3, 4)), "layer0.bias": np.ones(3)})
    with pytest.raises(safety_heads.HeadLoadError, match="3 outputs"):
        safety_heads.load_head(str(tmp_path / "three.npz"))
    np.savez(tmp_path / "gap.npz", **{"layer0.weight": np.ones((5, 4)), "layer0.bias": np.ones(5),
                                      "layer1.weight": np.ones((1, 6)), "layer1.bias": np.ones(1)})
    with pytest.raises(safety_heads.HeadLoadError, match="takes 6 inputs"):
        safety_heads.load_head(str(tmp_path / "gap.npz"))
    (tmp_path / "head.onnx").write_bytes(b"x")
    with pytest.raises(safety_heads.HeadLoadError, match="unknown format"):
        safety_heads.load_head(str(tmp_path / "head.onnx"))
    head = safety_heads.load_head(str(HEADS / "linear_d32.npz"))
    with pytest.raises(ValueError, match="dimension 32"):
        head.predict(np.zeros((2, 64), np.float32))
