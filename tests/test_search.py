"""`clipcrawl search`: embedding queries against exact search, and text/image queries embedded
with the tiny CLIP fixture model (the same `clip:` config as clip-score)."""

from __future__ import annotations

import numpy as np
import pytest

from spark_jobs import search
from tests.gen.embeddings_layout import (
    tiny_clip_missing,
    tiny_clip_overrides,
    write_random_subset,
    write_shapes_subset,
)
from udfs.index import build, tuning


@pytest.fixture(scope="module")
def random_index(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    _, image, text = write_random_subset(tmp / "dataset", n=400, dim=16, parts=2, seed=9)
    build.build_subset(str(tmp / "dataset" / "embeddings" / "laion2B-en"),
                     str(tmp / "indices" / "laion2B-en"), tuning.BuildParams(recall_sample=50, nb_cores=2))
    return tmp, image, text


def test_embedding_query_prints_exact_top_k(random_index, capsys):
    tmp, image, text = random_index
    np.save(tmp / "q.npy", text[123])
    rc = search.main(["--index", str(tmp / "indices" / "laion2B-en"), "--embedding", str(tmp / "q.npy"),
                      "-k", "5"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 5
    _, exact = tuning.exact_search([image], text[123:124], 5)
    urls = [line.split()[2] for line in lines]
    assert urls == [f"http://127.0.0.1/img/{i}.jpg" for i in exact[0]]
    scores = [float(line.split()[1]) for line in lines]
    assert scores == sorted(scores, reverse=True)


def test_bad_search_arguments_exit_2(random_index, capsys):
    tmp, image, _ = random_index
    np.save(tmp / "q.npy", image[0])
    base = ["--index", str(tmp / "indices"), "--embedding", str(tmp / "q.npy")]
    assert search.main(base + ["-k", "0"]) == 2
    assert "-k must be between" in capsys.readouterr().err
    assert search.main(base + ["--subset", "laion2B-xx"]) == 2
    assert "laion2B-xx" in capsys.readouterr().err
    np.save(tmp / "bad.npy", np.ones(7, np.float32))
    assert search.main(["--index", str(tmp / "indices"), "--embedding", str(tmp / "bad.npy")]) == 2
    assert "dimension" in capsys.readouterr().err
    assert search.main(["--index", str(tmp / "missing"), "--embedding", str(tmp / "q.npy")]) == 2


@pytest.fixture(scope="module")
def shapes_index(tmp_path_factory):
    reason = tiny_clip_missing()
    if reason:
        pytest.skip(reason)
    from udfs.clip.clip_model import load_clip

    tmp = tmp_path_factory.mktemp("shapes")
    model = load_clip(tiny_clip_overrides()[0].split("=", 1)[1], None, device="cpu")
    classes = write_shapes_subset(tmp / "dataset", tmp / "images", model, per_class=2)
    build.build_subset(str(tmp / "dataset" / "embeddings" / "laion2B-en"),
                     str(tmp / "indices" / "laion2B-en"), tuning.BuildParams(recall_sample=20, nb_cores=2))
    return tmp, classes


def _overrides():
    return [x for o in tiny_clip_overrides() for x in ("--set", o)]


@pytest.mark.slow
@pytest.mark.parametrize("query", ["a red circle", "a blue star", "a yellow square"])
def test_text_query_finds_the_shape(shapes_index, capsys, query):
    """The printed results are the exact top-k for the query as the clip config embeds it, and
    the best one is the shape asked for."""
    from udfs.clip.clip_model import load_clip

    tmp, classes = shapes_index
    rc = search.main(["--index", str(tmp / "indices" / "laion2B-en"), "--text", query, "-k", "3",
                      *_overrides()])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 3
    assert query.split(" ", 1)[1] in out[0], out  # "red circle"
    model = load_clip(tiny_clip_overrides()[0].split("=", 1)[1], None, device="cpu")
    images = np.concatenate([np.load(p) for p in sorted(
        (tmp / "dataset" / "embeddings" / "laion2B-en" / "img_emb").glob("*.npy"))]).astype(np.float32)
    _, exact = tuning.exact_search([images], model.encode_texts([query]), 3)
    assert [line.split()[2] for line in out] == [f"http://127.0.0.1/img/{i}.jpg" for i in exact[0]]


@pytest.mark.slow
def test_image_query_finds_the_shape(shapes_index, capsys):
    from tests.gen.shapes import draw_shape

    tmp, _ = shapes_index
    draw_shape("green", "triangle", size=64).save(tmp / "query.png")
    rc = search.main(["--index", str(tmp / "indices"), "--image", str(tmp / "query.png"), "-k", "1",
                      *_overrides()])
    out = capsys.readouterr().out
    assert rc == 0 and "green triangle" in out


def test_unreadable_image_query_exits_2(random_index, tmp_path, capsys):
    reason = tiny_clip_missing()
    if reason:
        pytest.skip(reason)
    (tmp_path / "not.png").write_bytes(b"plain text")
    tmp, *_ = random_index
    rc = search.main(["--index", str(tmp / "indices"), "--image", str(tmp_path / "not.png"),
                      *_overrides()])
    assert rc == 2 and "cannot read image" in capsys.readouterr().err
