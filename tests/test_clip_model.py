"""udfs.clip.clip_model and udfs.clip.embeddings: loading (local folder, checkpoints, errors), device and
precision selection, embeddings on the synthetic shapes, float16 codec and clip-retrieval layout."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.gen import shapes
from udfs.clip import clip_model, embeddings

TINY = Path(__file__).resolve().parent / "fixtures" / "tiny_clip"
TINY_SPEC = "local-dir:tests/fixtures/tiny_clip"


@pytest.fixture(scope="module")
def tiny():
    return clip_model.load_clip(TINY_SPEC, None, device="cpu")


# --- loading ----------------------------------------------------------------------------------------

def test_tiny_model_folder_is_small_and_loads_through_open_clip_local_dir():
    import open_clip

    weights = list(TINY.glob("*.safetensors"))
    assert len(weights) == 1 and weights[0].stat().st_size < 15 * 2**20
    cfg = json.loads((TINY / "open_clip_config.json").read_text())
    assert "hf_tokenizer_name" not in cfg["model_cfg"]["text_cfg"]  # offline SimpleTokenizer
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{TINY}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{TINY}")
    assert isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer)
    img = preprocess(shapes.draw_shape("red", "circle")).unsqueeze(0)
    assert model.encode_image(img).shape == (1, cfg["model_cfg"]["embed_dim"])


def test_load_clip_local_dir_relative_to_repo(tiny):
    assert tiny.device == "cpu" and tiny.precision == "fp32"
    assert tiny.dim == 64
    emb = tiny.encode_images([shapes.draw_shape("blue", "star"), shapes.draw_shape("green", "square", 200)])
    txt = tiny.encode_texts(["a blue star", "ein grünes Quadrat", "un triangle vert"])
    assert emb.shape == (2, 64) and txt.shape == (3, 64)
    assert emb.dtype == np.float32 and txt.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    assert tiny.encode_images([]).shape == (0, 64)
    assert tiny.encode_texts([]).shape == (0, 64)
    assert tuple(tiny.preprocess(shapes.draw_shape("red", "circle").convert("L")).shape) == (3, 32, 32)


def test_matching_captions_rank_first_on_independent_drawings(tiny):
    """Images from tests/gen/shapes.py (PIL), not the training renderer: top-1 over the 16
    classes in each language, and a clear gap between matching and mismatching similarities."""
    rng = random.Random(11)
    classes = shapes.all_classes()
    images = [shapes.draw_shape(c, s, size, bg, rng) for size, bg in ((48, "plain"), (96, "noisy"), (160, "plain"))
              for c, s in classes]
    labels = np.tile(np.arange(len(classes)), 3)
    img = tiny.encode_images(images)
    for lang in shapes.LANGS:
        txt = tiny.encode_texts([shapes.caption(c, s, lang) for c, s in classes])
        sim = img @ txt.T
        acc = float((sim.argmax(1) == labels).mean())
        assert acc >= 0.95, f"{lang}: top-1 {acc:.2f}"
        match = sim[np.arange(len(labels)), labels]
        others = np.ones_like(sim, dtype=bool)
        others[np.arange(len(labels)), labels] = False
        mismatch = sim[others]
        assert match.mean() - np.median(mismatch) > 0.3


def test_unknown_model_name():
    with pytest.raises(clip_model.ModelLoadError, match="unknown open_clip model name 'ViT-B-33'.*ViT-B-32"):
        clip_model.load_clip("ViT-B-33", None, device="cpu")


def test_missing_checkpoint_path(tmp_path):
    with pytest.raises(clip_model.ModelLoadError, match="checkpoint not found"):
        clip_model.load_clip("ViT-B-32", str(tmp_path / "nope.pt"), device="cpu")


def _copy_tiny(tmp_path, weights: bytes | None) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(TINY / "open_clip_config.json", folder)
    if weights is not None:
        (folder / "open_clip_model.safetensors").write_bytes(weights)
    return folder


def test_local_dir_errors(tmp_path):
    with pytest.raises(clip_model.ModelLoadError, match="folder not found"):
        clip_model.load_clip(f"local-dir:{tmp_path / 'absent'}", None, device="cpu")
    empty = _copy_tiny(tmp_path, None)
    with pytest.raises(clip_model.ModelLoadError, match="no weights"):  # open_clip would use random weights
        clip_model.load_clip(f"local-dir:{empty}", None, device="cpu")


def test_corrupt_checkpoint(tmp_path):
    good = (TINY / "open_clip_model.safetensors").read_bytes()
    folder = _copy_tiny(tmp_path, good[: len(good) // 2])  # truncated file
    with pytest.raises(clip_model.ModelLoadError, match="corrupt checkpoint"):
        clip_model.load_clip(f"local-dir:{folder}", None, device="cpu")


def test_checkpoint_path_for_a_named_config_and_wrong_architecture(tmp_path):
    """A named model + a checkpoint path (the cluster case), using the tiny config registered as
    a named open_clip config; then weights of another architecture fail clearly."""
    import open_clip

    cfg = json.loads((TINY / "open_clip_config.json").read_text())["model_cfg"]
    (tmp_path / "clipcrawl-tiny-test.json").write_text(json.dumps(cfg))
    wide = dict(cfg, embed_dim=32)
    (tmp_path / "clipcrawl-tiny-wide-test.json").write_text(json.dumps(wide))
    open_clip.add_model_config(tmp_path)
    ckpt = TINY / "open_clip_model.safetensors"
    model = clip_model.load_clip("clipcrawl-tiny-test", str(ckpt), device="cpu")
    assert model.dim == 64
    with pytest.raises(clip_model.ModelLoadError, match="another architecture"):
        clip_model.load_clip("clipcrawl-tiny-wide-test", str(ckpt), device="cpu")


def test_checkpoint_from_s3(moto_s3):
    """A local-dir model folder on S3 (moto on loopback) is fetched once to a temp folder."""
    moto_s3.bucket("models")
    bucket_dir = f"tiny-{random.randrange(10**9)}"
    for f in ("open_clip_config.json", "open_clip_model.safetensors"):
        moto_s3.client.upload_file(str(TINY / f), "models", f"{bucket_dir}/{f}")
    model = clip_model.load_clip(f"local-dir:s3://models/{bucket_dir}", None, device="cpu",
                                 storage_options=moto_s3.options)
    ref = clip_model.load_clip(TINY_SPEC, None, device="cpu")
    np.testing.assert_allclose(model.encode_texts(["a red star"]), ref.encode_texts(["a red star"]), atol=1e-6)



def test_remote_checkpoint_check_and_query_encoder_use_storage_options(moto_s3):
    """The driver-side checkpoint check and the search/serve query encoder reach S3 through the
    configured storage options (endpoint, credentials), like the workers do."""
    from udfs.index import search

    moto_s3.bucket("models")
    prefix = f"ckpt-{random.randrange(10**9)}"
    moto_s3.client.upload_file(str(TINY / "open_clip_model.safetensors"), "models", f"{prefix}/model.safetensors")
    spec = clip_model.check_model_spec("ViT-B-32", f"s3://models/{prefix}/model.safetensors", moto_s3.options)
    assert spec["kind"] == "remote-checkpoint"
    with pytest.raises(clip_model.ModelLoadError, match="checkpoint not found"):
        clip_model.check_model_spec("ViT-B-32", f"s3://models/{prefix}/missing.pt", moto_s3.options)
    for f in ("open_clip_config.json", "open_clip_model.safetensors"):
        moto_s3.client.upload_file(str(TINY / f), "models", f"{prefix}/tiny/{f}")
    encoder = search.QueryEncoder({"model": f"local-dir:s3://models/{prefix}/tiny", "pretrained": None,
                                "device": "cpu"}, moto_s3.options)
    ref = clip_model.load_clip(TINY_SPEC, None, device="cpu")
    np.testing.assert_allclose(encoder.encode_text("a red star"), ref.encode_texts(["a red star"])[0], atol=1e-6)

def test_cached_clip_builds_once_per_process():
    clip_model.clear_cache()
    a = clip_model.cached_clip(TINY_SPEC, None, "cpu")
    b = clip_model.cached_clip(TINY_SPEC, None, "cpu")
    assert a is b
    clip_model.clear_cache()


# --- device and precision ---------------------------------------------------------------------------

def test_select_device_with_cuda_mocked(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert clip_model.select_device("auto") == "cuda"
    assert clip_model.select_device("auto", gpu_addresses=["2"]) == "cuda:2"   # the GPU Spark assigned
    assert clip_model.select_device("cuda:1", gpu_addresses=["2"]) == "cuda:1"
    assert clip_model.select_device("cpu") == "cpu"
    assert clip_model.resolve_precision("auto", "cuda:2") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert clip_model.select_device("auto", gpu_addresses=["0"]) == "cpu"
    with pytest.raises(clip_model.ModelLoadError, match="CUDA is not available"):
        clip_model.select_device("cuda")
    assert clip_model.resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(clip_model.ModelLoadError, match="fp16 needs a CUDA"):
        clip_model.resolve_precision("fp16", "cpu")
    with pytest.raises(clip_model.ModelLoadError, match="unknown device"):
        clip_model.select_device("tpu")


def test_fp16_autocast_is_used_on_cuda(tiny, monkeypatch):
    """On a CUDA device the forward pass runs under torch.autocast(cuda, float16); checked with
    autocast recorded (no GPU here), so the CPU test suite covers the GPU code path's wiring."""
    import torch

    seen = []

    class Recorder:
        def __init__(self, device_type, dtype):
            seen.append((device_type, dtype))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch, "autocast", Recorder)
    model = clip_model.ClipModel(tiny.model, tiny._preprocess, tiny.tokenizer, "cpu", "fp16", "tiny")
    model.encode_texts(["a red circle"])
    assert seen and seen[-1] == ("cuda", torch.float16)


# --- embeddings codec and layout ----------------------------------------------------------------------

def test_float16_little_endian_roundtrip():
    v = np.array([1.0, -0.5, 0.25], dtype=np.float32)
    blob = embeddings.encode(v)
    assert blob == b"\x00\x3c\x00\xb8\x00\x34"  # IEEE half, little-endian
    np.testing.assert_array_equal(embeddings.decode(blob), v)
    m = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    rows = embeddings.encode_rows(m)
    assert len(rows) == 5 and all(len(r) == 16 for r in rows)
    np.testing.assert_allclose(embeddings.decode_rows(rows), m, rtol=1e-3, atol=1e-3)
    assert embeddings.decode_rows([], dim=8).shape == (0, 8)
    with pytest.raises(ValueError, match="different sizes"):
        embeddings.decode_rows([rows[0], rows[1][:4]])


def test_retrieval_layout_roundtrip_and_misalignment(tmp_path):
    import pandas as pd

    img = np.eye(3, 4, dtype=np.float32)
    txt = np.ones((3, 4), dtype=np.float32) / 2
    meta = pd.DataFrame({"url": ["u0", "u1", "u2"], "text": ["a", "b", "c"], "key": ["0", "1", "2"],
                         "similarity": [0.1, 0.2, 0.3]})
    embeddings.write_retrieval_part(str(tmp_path), 3, img, txt, meta)
    embeddings.write_retrieval_part(str(tmp_path), 10, img[:1], txt[:1], meta[:1])
    assert embeddings.list_retrieval_parts(str(tmp_path)) == [3, 10]
    a, b, m = embeddings.read_retrieval(str(tmp_path))
    assert a.dtype == np.float16 and a.shape == (4, 4) and b.shape == (4, 4)
    assert list(m["key"]) == ["0", "1", "2", "0"]
    with pytest.raises(ValueError, match="row counts differ"):
        embeddings.write_retrieval_part(str(tmp_path), 4, img, txt[:2], meta)
