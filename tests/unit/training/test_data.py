"""Tests for the procedural captioned-shapes dataset (training/data.py)."""

import numpy as np
import pytest
import torch

from fewstep.benchmarks.quality import parse_caption, position_of, relation_holds
from fewstep.training import data as D


def _scenes(seed, n, split="train"):
    rng = np.random.default_rng(seed)
    return [D.sample_scene(rng, split) for _ in range(n)]


def test_vocabulary_constants():
    assert len(D.SHAPES) >= 5 and len(D.COLORS) == 8
    assert set(D.SIZES) == {"small", "large"}
    assert set(D.POSITIONS) == {"left", "right", "top", "bottom", "center"}
    assert set(D.RELATIONS) == {"left of", "right of", "above", "below"}
    assert not set(D.BACKGROUNDS) & set(D.COLORS)
    assert not set(D.BACKGROUNDS.values()) & set(D.COLORS.values())
    v = D.vocabulary()
    assert v == sorted(set(v)) and all(w == w.lower() and " " not in w for w in v)


def test_determinism():
    a_img, a_cap = D.sample_batch(np.random.default_rng(123), 32)
    b_img, b_cap = D.sample_batch(np.random.default_rng(123), 32)
    assert a_cap == b_cap
    assert torch.equal(a_img, b_img)
    c_img, c_cap = D.sample_batch(np.random.default_rng(124), 32)
    assert c_cap != a_cap
    assert D.heldout_prompts(20, seed=3) == D.heldout_prompts(20, seed=3)
    assert D.train_prompts(20, seed=3) == D.train_prompts(20, seed=3)
    va = D.render_video([D.sample_video_scene(np.random.default_rng(5))], 6)
    vb = D.render_video([D.sample_video_scene(np.random.default_rng(5))], 6)
    assert torch.equal(va, vb)


@pytest.mark.parametrize("size", [32, 64, 96])
def test_value_range_and_shapes(size):
    x, caps = D.sample_batch(np.random.default_rng(0), 16, size=size, split="heldout")
    assert x.shape == (16, 3, size, size) and x.dtype == torch.float32
    assert len(caps) == 16
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert float(x.min()) < -0.5 and float(x.max()) > 0.5    # not degenerate
    u = D.render_uint8(_scenes(1, 1)[0], size)
    assert u.shape == (size, size, 3) and u.dtype == np.uint8


def _check_scene_matches_spec(scene_objs, background, spec):
    assert spec.background == background
    assert len(spec.objects) == len(scene_objs)
    for o, s in zip(scene_objs, spec.objects):
        assert (s.shape, s.color) == (o.shape, o.color)
        assert s.size in (None, o.size)
        if s.position is not None:
            assert position_of(o.cx, o.cy) == s.position
    for i, rel, j in spec.relations:
        assert relation_holds(scene_objs[i], rel, scene_objs[j]), (rel, scene_objs[i], scene_objs[j])


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_captions_parse_back_to_scene(split):
    for sc in _scenes(7, 1500, split):
        spec = parse_caption(sc.caption)
        _check_scene_matches_spec(sc.objects, sc.background, spec)
        for o in sc.objects:  # inside the image
            assert o.extent <= o.cx <= 1 - o.extent and o.extent <= o.cy <= 1 - o.extent
        for i, a in enumerate(sc.objects):  # no overlap
            for b in sc.objects[i + 1:]:
                assert np.hypot(a.cx - b.cx, a.cy - b.cy) > a.extent + b.extent


def test_caption_variety():
    caps = [s.caption for s in _scenes(0, 2000)]
    n_objs = [len(parse_caption(c).objects) for c in caps]
    assert set(n_objs) == {1, 2, 3}
    assert len(set(caps)) > 1500


def test_heldout_split():
    assert 0.10 <= len(D.HELDOUT_PAIRS) / (len(D.SHAPES) * len(D.COLORS)) <= 0.15
    # every shape and colour is still seen in training
    train_pairs = {(s, c) for s in D.SHAPES for c in D.COLORS} - D.HELDOUT_PAIRS
    assert {s for s, _ in train_pairs} == set(D.SHAPES)
    assert {c for _, c in train_pairs} == set(D.COLORS)
    train = _scenes(11, 20000, "train")
    train_caps = {s.caption for s in train}
    for s in train:
        assert D.split_of(s.objects) == "train"
    held = D.heldout_prompts(500, seed=1)
    assert not train_caps & set(held)
    for c in held:
        spec = parse_caption(c)
        assert any((o.shape, o.color) in D.HELDOUT_PAIRS for o in spec.objects)
    for c in D.train_prompts(500, seed=1):
        spec = parse_caption(c)
        assert not any((o.shape, o.color) in D.HELDOUT_PAIRS for o in spec.objects)


def test_vocabulary_covers_all_caption_words():
    vocab = set(D.vocabulary())
    words = set()
    for split in ("train", "heldout"):
        for s in _scenes(3, 3000, split):
            words.update(s.caption.split())
        rng = np.random.default_rng(4)
        for _ in range(500):
            words.update(D.sample_video_scene(rng, split).caption.split())
    assert words <= vocab
    assert len(vocab - words) == 0   # and nothing in the vocabulary is unused


def test_video_chunks_are_consistent():
    rng = np.random.default_rng(9)
    vss = [D.sample_video_scene(rng) for _ in range(6)]
    full = D.render_video(vss, 40)
    assert full.shape == (6, 40, 3, 64, 64)
    for s in (0, 7, 13, 25):
        chunk = D.render_video(vss, 9, start_frame=s)
        n = min(9, 40 - s)
        torch.testing.assert_close(chunk[:, :n], full[:, s:s + n], atol=1e-6, rtol=0)
    # far beyond the first frames (unbounded streaming) still renders objects inside the image
    far = D.render_video(vss, 2, start_frame=100_000)
    assert far.shape == (6, 2, 3, 64, 64)


def test_video_captions_and_motion():
    rng = np.random.default_rng(2)
    for split in ("train", "heldout"):
        for _ in range(300):
            vs = D.sample_video_scene(rng, split)
            assert D.split_of(vs.objects, vs.motions) == split
            spec = parse_caption(vs.caption)
            assert spec.background == vs.background
            assert len(spec.objects) == len(vs.objects) == len(vs.motions)
            for o, m, s in zip(vs.objects, vs.motions, spec.objects):
                assert (s.shape, s.color) == (o.shape, o.color)
                assert s.motion == (m.direction if m.kind == "move" else None)
                assert s.turn_to == (m.to_color if m.kind == "turn" else None)
            # positions stay inside the image for a long time and move with the caption at t=0
            cx, cy, _ = D.video_frame_objects(vs, np.arange(0, 400))
            for k, (o, m) in enumerate(zip(vs.objects, vs.motions)):
                assert cx[:, k].min() >= 0 and cx[:, k].max() <= 1
                assert cy[:, k].min() >= 0 and cy[:, k].max() <= 1
                if m.kind == "move":
                    axis_pos = cx[:, k] if m.direction in ("left", "right") else cy[:, k]
                    sign = 1 if m.direction in ("right", "down") else -1
                    assert (axis_pos[1] - axis_pos[0]) * sign > 0
