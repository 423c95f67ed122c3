"""jaxcontrol.data: procedural fill50k, the manifest folder builder, the grain loader, precomputed latents."""

import functools
import json
import os
import pickle

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxcontrol.data import (
    ManifestError,
    PrecomputedSource,
    build_fill50k,
    build_folder,
    fill50k_example,
    make_dataset,
    open_source,
    precompute_latents,
    read_manifest,
)
from jaxcontrol.data.fill50k import MIN_COLOR_DISTANCE, check_colors, draw_circle
from jaxcontrol.data.loader import load_iterator_state, save_iterator_state, shard_indices
from jaxcontrol.data.manifest import DataError, resize_center_crop
from jaxcontrol.errors import ConfigError

SIZE = 24
COLORS = (("red", (255, 0, 0)), ("blue", (0, 0, 255)), ("green", (0, 128, 0)), ("light blue", (173, 216, 230)))
F50K = dict(image_size=SIZE, num_train=24, num_validation=6, seed=3, colors=COLORS)


@pytest.fixture(scope="module")
def fill50k(tmp_path_factory):
    return build_fill50k(tmp_path_factory.mktemp("tfds"), **F50K)


def _records_by_index(source):
    return {int(r["index"]): r for r in (source[i] for i in range(len(source)))}


def _list_source(n, size=4):
    """Plain in-memory source whose record `index` equals its position."""
    return [
        {
            "image": np.full((size, size, 3), i % 256, np.uint8),
            "conditioning_image": np.full((size, size, 3), (3 * i) % 256, np.uint8),
            "text": f"example {i}".encode(),
            "index": i,
        }
        for i in range(n)
    ]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------------------------------ fill50k


def test_fill50k_example_is_a_pure_function_of_seed_split_index():
    a = fill50k_example(5, seed=1, image_size=SIZE, colors=COLORS)
    b = fill50k_example(5, seed=1, image_size=SIZE, colors=COLORS)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.condition, b.condition)
    assert (a.caption, a.center, a.radius) == (b.caption, b.center, b.radius)
    others = [
        fill50k_example(6, seed=1, image_size=SIZE, colors=COLORS),
        fill50k_example(5, seed=2, image_size=SIZE, colors=COLORS),
        fill50k_example(5, seed=1, split="validation", image_size=SIZE, colors=COLORS),
    ]
    for o in others:
        assert (o.center, o.radius) != (a.center, a.radius)


def test_fill50k_example_content_matches_its_metadata():
    names = dict(COLORS)
    for i in range(8):
        ex = fill50k_example(i, seed=0, image_size=64, colors=COLORS)
        assert ex.caption == f"{ex.circle_color} circle with {ex.background_color} background"
        assert ex.image.shape == ex.condition.shape == (64, 64, 3) and ex.image.dtype == np.uint8
        cx, cy = ex.center
        assert ex.radius <= cx <= 64 - ex.radius and ex.radius <= cy <= 64 - ex.radius
        # the centre pixel has the circle's colour; a pixel outside the circle the background's
        np.testing.assert_array_equal(ex.image[int(cy), int(cx)], names[ex.circle_color])
        yy, xx = np.mgrid[:64, :64] + 0.5
        d = np.hypot(xx - cx, yy - cy)
        outside = np.argwhere(d > ex.radius + 2)[0]
        np.testing.assert_array_equal(ex.image[tuple(outside)], names[ex.background_color])
        assert np.linalg.norm(np.subtract(names[ex.circle_color], names[ex.background_color])) >= MIN_COLOR_DISTANCE
        # the condition: white on the circle's outline, black away from it, grey levels equal over RGB
        on = np.abs(d - ex.radius) < 0.3
        assert on.any() and (ex.condition[on] == 255).all()
        assert (ex.condition[np.abs(d - ex.radius) > 2] == 0).all()
        assert (ex.condition[..., 0] == ex.condition[..., 2]).all()


def test_fill50k_colour_vocabulary_is_checked():
    with pytest.raises(ConfigError, match="twice"):
        check_colors([("red", (255, 0, 0)), ("red", (250, 0, 0))])
    with pytest.raises(ConfigError, match="0..255"):
        check_colors([("red", (256, 0, 0)), ("blue", (0, 0, 255))])
    with pytest.raises(ConfigError, match="no \\(circle, background\\) pair"):
        check_colors([("red", (255, 0, 0)), ("crimson", (250, 10, 10))])
    with pytest.raises(ConfigError, match="split"):
        fill50k_example(0, split="test")


def test_draw_circle_antialiasing_is_bounded_by_the_two_colours():
    img, cond = draw_circle(32, (15.3, 16.7), 9.2, (200, 10, 10), (10, 10, 200))
    assert img[..., 0].min() >= 10 and img[..., 0].max() <= 200
    partial = (img[..., 0] > 10) & (img[..., 0] < 200)
    assert 0 < partial.sum() < 2 * np.pi * 9.2 * 2  # one ring of partial pixels, not a blurred disc


def test_fill50k_builder_records_equal_the_numpy_examples(fill50k, tmp_path):
    for split, n in (("train", F50K["num_train"]), ("validation", F50K["num_validation"])):
        src = fill50k.as_data_source(split)
        recs = _records_by_index(src)
        assert sorted(recs) == list(range(n))
        for i, r in recs.items():
            ex = fill50k_example(i, split=split, seed=F50K["seed"], image_size=SIZE, colors=COLORS)
            np.testing.assert_array_equal(r["image"], ex.image)
            np.testing.assert_array_equal(r["conditioning_image"], ex.condition)
            assert r["text"].decode() == ex.caption
            assert r["circle_color"].decode() == ex.circle_color
            np.testing.assert_allclose(r["center"], ex.center, rtol=1e-6)
            np.testing.assert_allclose(r["radius"], ex.radius, rtol=1e-6)
    # held out: the validation examples are other draws than the training ones
    train = {(round(float(r["radius"]), 4), r["text"]) for r in _records_by_index(fill50k.as_data_source("train")).values()}
    val = {(round(float(r["radius"]), 4), r["text"]) for r in _records_by_index(fill50k.as_data_source("validation")).values()}
    assert not train & val
    # a second build elsewhere is byte-identical; reading back without the builder class works
    again = build_fill50k(tmp_path, **F50K)
    a, b = fill50k.as_data_source("train"), again.as_data_source("train")
    for i in range(len(a)):
        for k in ("image", "conditioning_image", "text", "index"):
            np.testing.assert_array_equal(a[i][k], b[i][k])
    reopened = open_source(again.data_dir, "validation")
    assert len(reopened) == F50K["num_validation"]
    with pytest.raises(ConfigError, match="no split"):
        open_source(again.data_dir, "test")


def test_fill50k_builder_needs_a_data_dir():
    with pytest.raises(ConfigError, match="data_dir is required"):
        build_fill50k(None, **F50K)


# ------------------------------------------------------------------------------------------- loader


def test_loader_batches_have_diffusers_training_conventions(fill50k, tmp_path):
    from jaxcontrol.testing.reference import tiny_clip_tokenizer
    from jaxcontrol.tokenizer import load_tokenizer, tokenize

    tok = load_tokenizer(tiny_clip_tokenizer(tmp_path / "tok"))
    src = fill50k.as_data_source("train")
    ds = make_dataset(src, batch_size=5, seed=0, shard_index=0, shard_count=1, tokenize_fn=functools.partial(tokenize, tok))
    batch = next(iter(ds))
    assert batch["pixel_values"].shape == (5, SIZE, SIZE, 3) and batch["pixel_values"].dtype == np.float32
    assert batch["conditioning_pixel_values"].shape == (5, SIZE, SIZE, 3)
    assert batch["conditioning_pixel_values"].dtype == np.float32
    assert batch["input_ids"].shape == (5, 77) and batch["input_ids"].dtype == np.int32
    for j, i in enumerate(batch["index"]):
        ex = fill50k_example(int(i), seed=F50K["seed"], image_size=SIZE, colors=COLORS)
        np.testing.assert_allclose(batch["pixel_values"][j], ex.image / 127.5 - 1, atol=1e-6)
        np.testing.assert_allclose(batch["conditioning_pixel_values"][j], ex.condition / 255.0, atol=1e-7)
        assert batch["caption"][j] == ex.caption
        np.testing.assert_array_equal(batch["input_ids"][j], tokenize(tok, [ex.caption])[0])
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1


def test_loader_epochs_are_reshuffled_permutations():
    n, bs = 12, 4
    ds = make_dataset(_list_source(n), batch_size=bs, seed=7, shard_index=0, shard_count=1)
    it = iter(ds)
    order = np.concatenate([b["index"] for b in _take(it, 3 * n // bs)])
    epochs = order.reshape(3, n)
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert not (epochs[0] == epochs[1]).all() and not (epochs[1] == epochs[2]).all()
    # same seed -> same order; other seed -> other order; no shuffle -> source order
    again = np.concatenate([b["index"] for b in _take(iter(ds), n // bs)])
    np.testing.assert_array_equal(again, epochs[0])
    other = make_dataset(_list_source(n), batch_size=bs, seed=8, shard_index=0, shard_count=1)
    assert not (np.concatenate([b["index"] for b in _take(iter(other), n // bs)]) == epochs[0]).all()
    plain = make_dataset(_list_source(n), batch_size=bs, shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in plain]), np.arange(n))


@pytest.mark.parametrize("n,hosts", [(24, 2), (23, 3)])
def test_loader_host_shards_partition_the_examples(n, hosts):
    per_host = n // hosts
    seen = []
    for h in range(hosts):
        ds = make_dataset(_list_source(n), batch_size=1, seed=0, num_epochs=1, shard_index=h, shard_count=hosts)
        idx = [int(b["index"][0]) for b in ds]
        assert len(idx) == per_host == len(set(idx))  # equal share on every host, no repeats
        assert sorted(idx) == list(shard_indices(n, h, hosts))
        seen.append(set(idx))
    for a in range(hosts):
        for b in range(a + 1, hosts):
            assert not seen[a] & seen[b]
    assert set().union(*seen) == set(range(per_host * hosts))
    with pytest.raises(ConfigError, match="shard_index"):
        make_dataset(_list_source(n), batch_size=1, shard_index=hosts, shard_count=hosts)


def test_loader_host_shards_of_a_tfds_source(fill50k):
    src = fill50k.as_data_source("train")
    got = []
    for h in range(2):
        ds = make_dataset(src, batch_size=4, seed=0, num_epochs=1, shard_index=h, shard_count=2)
        got.append([int(i) for b in ds for i in b["index"]])
    assert len(got[0]) == len(got[1]) == F50K["num_train"] // 2
    assert sorted(got[0] + got[1]) == list(range(F50K["num_train"]))


def test_loader_resume_is_exact(fill50k, tmp_path):
    src = fill50k.as_data_source("train")
    ds = make_dataset(src, batch_size=5, seed=11, shard_index=1, shard_count=2, read_threads=2)
    it = iter(ds)
    _take(it, 2)  # 10 of the 12 examples of this shard: the continuation crosses an epoch boundary
    save_iterator_state(it, tmp_path / "state" / "data.json")
    expected = _take(it, 6)
    fresh = iter(make_dataset(src, batch_size=5, seed=11, shard_index=1, shard_count=2, read_threads=2))
    load_iterator_state(fresh, tmp_path / "state" / "data.json")
    _assert_batches_equal(_take(fresh, 6), expected)
    # without the restore, a fresh iterator starts over: the check above can fail
    start = _take(iter(ds), 1)[0]
    assert not np.array_equal(start["index"], expected[0]["index"])
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["data.json"]  # no temp file left
    with pytest.raises(DataError, match="not found"):
        load_iterator_state(fresh, tmp_path / "missing.json")


def test_loader_resume_with_worker_processes():
    ds = make_dataset(_list_source(20, size=8), batch_size=3, seed=5, shard_index=0, shard_count=1, num_workers=1)
    it = iter(ds)
    try:
        _take(it, 4)
        state = json.loads(json.dumps(it.get_state()))
        expected = _take(it, 5)
    finally:
        it.close()
    fresh = iter(ds)
    try:
        fresh.set_state(state)
        _assert_batches_equal(_take(fresh, 5), expected)
    finally:
        fresh.close()


def test_iterator_state_in_an_orbax_checkpoint(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    ds = make_dataset(_list_source(30), batch_size=4, seed=2, shard_index=0, shard_count=1)
    it = iter(ds)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2)) as mgr:
        mgr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
        expected = _take(it, 4)
        fresh = iter(ds)
        mgr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_batches_equal(_take(fresh, 4), expected)


def test_loader_resolution_resizes_and_crops():
    src = [{"image": np.zeros((12, 20, 3), np.uint8), "conditioning_image": np.full((12, 20, 1), 255, np.uint8),
            "text": b"x", "index": 0}]
    b = next(iter(make_dataset(src, batch_size=1, shard_index=0, shard_count=1, transform=None)))
    assert b["pixel_values"].shape == (1, 12, 20, 3) and b["conditioning_pixel_values"].shape == (1, 12, 20, 3)
    from jaxcontrol.data.loader import ControlTransform

    out = ControlTransform(resolution=8)(src[0])
    assert out["pixel_values"].shape == (8, 8, 3) and (out["conditioning_pixel_values"] == 1).all()


def test_loader_argument_errors():
    src = _list_source(6)
    with pytest.raises(ConfigError, match="batch_size"):
        make_dataset(src, batch_size=0, shard_index=0, shard_count=1)
    with pytest.raises(ConfigError, match="both shard_index and shard_count"):
        make_dataset(src, batch_size=1, shard_index=0)
    with pytest.raises(ConfigError, match="cannot be split"):
        make_dataset(src, batch_size=1, shard_index=0, shard_count=7)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        make_dataset(src, batch_size=5, num_epochs=1, shard_index=0, shard_count=2)


# ----------------------------------------------------------------------------------- manifest folder


def _write_folder(root, n=4, sizes=None):
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    (root / "cond").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    lines, arrays = [], []
    for i in range(n):
        h, w = sizes[i] if sizes else (16, 16)
        im = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        cond = (rng.random((h, w)) > 0.8).astype(np.uint8) * 255
        Image.fromarray(im).save(root / "img" / f"{i}.png")
        Image.fromarray(cond, mode="L").save(root / "cond" / f"{i}.png")  # 1-channel conditions become RGB
        lines.append(json.dumps({"image": f"img/{i}.png", "condition": f"cond/{i}.png", "text": f"caption {i}"}))
        arrays.append((im, cond))
    return lines, arrays


def test_folder_builder_roundtrip(tmp_path):
    lines, arrays = _write_folder(tmp_path / "data", n=4)
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(lines[:3]) + "\n\n")
    (tmp_path / "data" / "val.jsonl").write_text(lines[3] + "\n")
    b = build_folder(tmp_path / "tfds", {"train": tmp_path / "data" / "train.jsonl",
                                         "validation": tmp_path / "data" / "val.jsonl"})
    train = _records_by_index(b.as_data_source("train"))
    assert sorted(train) == [1, 2, 3]  # manifest line numbers
    for line, r in train.items():
        im, cond = arrays[line - 1]
        np.testing.assert_array_equal(r["image"], im)
        np.testing.assert_array_equal(r["conditioning_image"], np.repeat(cond[..., None], 3, -1))
        assert r["text"].decode() == f"caption {line - 1}" and r["image_path"].decode() == f"img/{line - 1}.png"
    (val,) = _records_by_index(b.as_data_source("validation")).values()
    assert val["text"] == b"caption 3"
    batch = next(iter(make_dataset(b.as_data_source("train"), batch_size=3, shard_index=0, shard_count=1)))
    assert batch["pixel_values"].shape == (3, 16, 16, 3)


def test_folder_builder_resizes_to_image_size(tmp_path):
    lines, arrays = _write_folder(tmp_path / "data", n=2, sizes=[(20, 30), (32, 16)])
    (tmp_path / "data" / "m.jsonl").write_text("\n".join(lines))
    b = build_folder(tmp_path / "tfds", tmp_path / "data" / "m.jsonl", image_size=8)
    recs = _records_by_index(b.as_data_source("train"))
    for line, r in recs.items():
        assert r["image"].shape == (8, 8, 3)
        expected = np.asarray(resize_center_crop(Image.fromarray(arrays[line - 1][0]), 8))
        np.testing.assert_array_equal(r["image"], expected)


def test_manifest_errors_name_the_file_and_line(tmp_path):
    lines, _ = _write_folder(tmp_path, n=2)
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join([
        lines[0],
        '{"image": "img/0.png", "condition": "cond/0.png"',  # line 2: broken JSON
        '{"image": "img/1.png", "condition": "cond/1.png"}',  # line 3: missing key
        '{"image": "img/404.png", "condition": "cond/1.png", "text": "t"}',  # line 4: missing file
        '["not", "an", "object"]',  # line 5
    ]))
    with pytest.raises(ManifestError) as e:
        read_manifest(m)
    msg = str(e.value)
    assert f"{m}:2: invalid JSON" in msg
    assert f"{m}:3: missing key(s) ['text']" in msg
    assert f"{m}:4: image file not found: {tmp_path / 'img' / '404.png'}" in msg
    assert f"{m}:5: expected a JSON object" in msg
    assert f"{m}:1" not in msg
    with pytest.raises(ManifestError, match="manifest file not found"):
        read_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ManifestError, match="no examples"):
        read_manifest(tmp_path / "empty.jsonl")


def test_folder_builder_unreadable_image_fails_naming_line_and_file(tmp_path):
    lines, _ = _write_folder(tmp_path / "data", n=2)
    (tmp_path / "data" / "img" / "1.png").write_bytes(b"this is not a png")
    (tmp_path / "data" / "m.jsonl").write_text("\n".join(lines))
    with pytest.raises(ManifestError) as e:
        build_folder(tmp_path / "tfds", tmp_path / "data" / "m.jsonl")
    assert f"m.jsonl:2: {tmp_path / 'data' / 'img' / '1.png'}: cannot open as an image" in str(e.value)
    # nothing half-written: no finished dataset folder
    assert not list((tmp_path / "tfds").rglob("dataset_info.json"))


def test_folder_builder_condition_size_mismatch(tmp_path):
    lines, _ = _write_folder(tmp_path / "data", n=1)
    Image.new("L", (5, 5)).save(tmp_path / "data" / "cond" / "0.png")
    (tmp_path / "data" / "m.jsonl").write_text(lines[0])
    with pytest.raises(ManifestError, match="m.jsonl:1: image .* is 16x16 but condition .* is 5x5"):
        build_folder(tmp_path / "tfds", tmp_path / "data" / "m.jsonl")


# -------------------------------------------------------------------------------------- precompute


@jax.jit
def _encode_images(x):  # stands in for a VAE encoder: (B, H, W, 3) -> (B, H/8, W/8, 4)
    b, h, w, _ = x.shape
    pooled = x.reshape(b, h // 8, 8, w // 8, 8, 3).mean(axis=(2, 4))
    return jnp.concatenate([pooled, pooled.sum(-1, keepdims=True)], axis=-1)


def _encode_text(captions):
    return np.stack([np.full((3, 2), len(c), np.float32) + np.arange(2) for c in captions])


def test_precompute_latents_roundtrip_through_the_loader(fill50k, tmp_path):
    src = fill50k.as_data_source("train")
    pre = precompute_latents(src, tmp_path / "pre", encode_images=_encode_images, encode_text=_encode_text,
                             batch_size=5, records_per_shard=10)
    assert len(pre) == len(src) and len(pre.paths) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pre"]  # renamed into place, no partial folder
    for i in (0, 7, len(src) - 1):  # the last one came from a padded batch
        r, s = pre[i], src[i]
        ex = fill50k_example(int(s["index"]), seed=F50K["seed"], image_size=SIZE, colors=COLORS)
        expect = np.asarray(_encode_images(jnp.asarray(ex.image[None] / 127.5 - 1, jnp.float32)))[0]
        np.testing.assert_allclose(r["latents"], expect, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(r["text_embeddings"], _encode_text([ex.caption])[0])
        np.testing.assert_array_equal(r["conditioning_image"], ex.condition)
        assert r["text"] == ex.caption and r["index"] == s["index"]
    pre = pickle.loads(pickle.dumps(PrecomputedSource(tmp_path / "pre")))
    batch = next(iter(make_dataset(pre, batch_size=4, shard_index=0, shard_count=1)))
    assert batch["latents"].shape == (4, SIZE // 8, SIZE // 8, 4)
    assert batch["encoder_hidden_states"].shape == (4, 3, 2)
    assert batch["conditioning_pixel_values"].shape == (4, SIZE, SIZE, 3) and "pixel_values" not in batch
    with pytest.raises(ConfigError, match="not empty"):
        precompute_latents(src, tmp_path / "pre", encode_images=_encode_images)


def test_precompute_failure_leaves_nothing(fill50k, tmp_path):
    calls = []

    def failing(x):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("encoder broke")
        return np.zeros((x.shape[0], 1), np.float32)

    with pytest.raises(RuntimeError, match="encoder broke"):
        precompute_latents(fill50k.as_data_source("train"), tmp_path / "pre", encode_images=failing, batch_size=4)
    assert os.listdir(tmp_path) == []
    with pytest.raises(DataError, match="first axis must be the batch"):
        precompute_latents(fill50k.as_data_source("train"), tmp_path / "pre", encode_images=lambda x: x[:1])
    with pytest.raises(DataError, match="no meta.json"):
        PrecomputedSource(tmp_path)
