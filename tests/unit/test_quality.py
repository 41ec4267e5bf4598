"""Tests for the procedural quality metric (benchmarks/quality.py)."""

import numpy as np
import pytest

from fewstep.benchmarks import quality as Q
from fewstep.training import data as D


@pytest.fixture(scope="module")
def scenes_and_images():
    rng = np.random.default_rng(42)
    scenes = [D.sample_scene(rng, "train" if i % 2 else "heldout") for i in range(60)]
    return scenes, D.to_uint8(D.render(scenes))


def test_self_check_passes():
    r = Q.self_check(n=120, seed=1)
    assert r["clean_accuracy"] >= 0.95, r["failures"]
    assert r["noisy_accuracy"] >= 0.95, r["failures"]


def test_detector_on_clean_render(scenes_and_images):
    scenes, ims = scenes_and_images
    for sc, im in zip(scenes[:20], ims[:20]):
        dets = Q.detect(im)
        assert len(dets) == len(sc.objects)
        for o in sc.objects:
            d = min(dets, key=lambda d: (d.cx - o.cx) ** 2 + (d.cy - o.cy) ** 2)
            assert (d.shape, d.color, d.size) == (o.shape, o.color, o.size)
            assert abs(d.cx - o.cx) < 0.02 and abs(d.cy - o.cy) < 0.02


def test_noise_and_flat_images_fail(scenes_and_images):
    scenes, _ = scenes_and_images
    rng = np.random.default_rng(0)
    caps = [s.caption for s in scenes]
    noise = rng.integers(0, 256, (len(caps), 64, 64, 3), dtype=np.uint8)
    assert Q.adherence(noise, caps)["accuracy"] <= 0.05
    flat = np.broadcast_to(rng.integers(0, 256, (len(caps), 1, 1, 3), dtype=np.uint8), noise.shape)
    assert Q.adherence(flat, caps)["accuracy"] == 0.0
    for bg in ("white", "black"):
        blank = np.broadcast_to(np.array(D.BACKGROUNDS[bg], np.uint8), (64, 64, 3))
        assert not Q.score(blank, f"a red circle on a {bg} background")["correct"]


def test_wrong_captions_fail(scenes_and_images):
    scenes, ims = scenes_and_images
    rng = np.random.default_rng(1)
    n_ok = 0
    for sc, im in zip(scenes, ims):
        assert Q.score(im, sc.caption)["correct"]
        n_ok += 1
        o = sc.objects[0]
        other = [c for c in D.COLORS if c != o.color][int(rng.integers(7))]
        words = sc.caption.split()
        i = words.index(o.color)
        words_bad = words[:i] + [other] + words[i + 1:]
        if i > 0 and words_bad[i - 1] in ("a", "an"):
            words_bad[i - 1] = "an" if other[0] in "aeiou" else "a"
        bad = " ".join(words_bad)
        r = Q.score(im, bad)
        assert not r["correct"] and not r["colors"], bad
        other_shape = [s for s in D.SHAPES if s != o.shape][int(rng.integers(len(D.SHAPES) - 1))]
        j = words.index(o.shape)
        r = Q.score(im, " ".join(words[:j] + [other_shape] + words[j + 1:]))
        assert not r["correct"] and not r["shapes"]
    # swapped relation / position
    sc = D.Scene([D.Obj("circle", "red", "large", 0.25, 0.5), D.Obj("square", "blue", "small", 0.75, 0.5)],
                 "white", "a large red circle left of a small blue square on a white background")
    im = D.render_uint8(sc)
    assert Q.score(im, sc.caption)["correct"]
    assert not Q.score(im, "a large red circle right of a small blue square on a white background")["positions"]
    assert not Q.score(im, "a small red circle left of a small blue square on a white background")["sizes"]
    assert not Q.score(im, "a large red circle left of a small blue square on a black background")["background"]
    assert not Q.score(im, "a large red circle on a white background")["count"]
    single = D.render_uint8(D.Scene([D.Obj("star", "green", "large", 0.25, 0.5)], "gray", ""))
    assert Q.score(single, "a green star on the left on a gray background")["correct"]
    assert not Q.score(single, "a green star on the right on a gray background")["correct"]


def test_parse_caption():
    s = Q.parse_caption("a small green star above a large yellow diamond which is left of an orange triangle "
                        "on a black background")
    assert [(o.shape, o.color, o.size) for o in s.objects] == [
        ("star", "green", "small"), ("diamond", "yellow", "large"), ("triangle", "orange", None)]
    assert s.relations == [(0, "above", 1), (1, "left of", 2)]
    assert s.background == "black"
    v = Q.parse_caption("a red circle moving up and a blue square turning pink on a navy background")
    assert v.objects[0].motion == "up" and v.objects[1].turn_to == "pink"
    with pytest.raises(ValueError):
        Q.parse_caption("a purple elephant on a white background")


def test_diversity():
    ims, _ = D.sample_batch(np.random.default_rng(0), 8)
    u = D.to_uint8(ims)
    same = np.stack([u[0]] * 5)
    assert Q.diversity(same) == 0.0
    assert Q.diversity(u) > 0.05
    rep = Q.diversity_report(same)
    assert rep["pixel"] == 0.0 and rep["center_spread"] == pytest.approx(0.0, abs=1e-9)
    # same prompt, objects in different places -> positive centre spread
    moved = [D.render_uint8(D.Scene([D.Obj("circle", "red", "large", x, 0.5)], "white", "")) for x in (0.3, 0.5, 0.7)]
    rep = Q.diversity_report(moved)
    assert rep["pixel"] > 0 and rep["center_spread"] > 0.1


def _video(direction="right", frames=16, cx=0.3, speed=0.02):
    axis_h = direction in ("left", "right")
    o = D.Obj("triangle", "blue", "large", cx if axis_h else 0.5, 0.5 if axis_h else cx)
    cap = f"a large blue triangle moving {direction} on a white background"
    vs = D.VideoScene([o], [D.Motion("move", direction, speed)], "white", cap)
    return D.render_video_uint8(vs, frames), cap


def test_video_motion_correct_vs_reversed():
    frames, cap = _video("right")
    m = Q.video_metrics(frames, cap, [4, 8, 12])
    assert m["motion_accuracy"] == 1.0 and m["identity_consistency"] == 1.0 and m["frame_adherence"] == 1.0
    assert Q.video_metrics(frames[::-1], cap, [8])["motion_accuracy"] <= 0.1
    assert Q.video_metrics(frames, cap.replace("right", "left"), [8])["motion_accuracy"] <= 0.1
    frames_up, cap_up = _video("up", cx=0.7)
    assert Q.video_metrics(frames_up, cap_up, [8])["motion_accuracy"] == 1.0
    assert Q.video_metrics(frames_up, cap_up.replace("up", "down"), [8])["motion_accuracy"] <= 0.1
    # static object: no credit for motion
    still = np.stack([frames[0]] * 16)
    assert Q.video_metrics(still, cap, [8])["motion_accuracy"] <= 0.1


def test_video_bounce_is_allowed():
    frames, cap = _video("right", frames=60, cx=0.5, speed=0.025)
    m = Q.video_metrics(frames, cap, list(range(8, 60, 8)))
    assert m["motion_accuracy"] >= 0.95


def test_video_identity_consistency():
    a, cap = _video("right")
    other = D.VideoScene([D.Obj("circle", "red", "large", 0.3, 0.5)], [D.Motion("move", "right", 0.02)], "white", "")
    b = D.render_video_uint8(other, 16, start_frame=8)
    spliced = np.concatenate([a[:8], b[8:]])
    m = Q.video_metrics(spliced, cap, [4, 8, 12])
    assert m["identity_consistency"] == pytest.approx(2 / 3)
    assert m["frame_adherence"] == pytest.approx(0.5)


def test_video_self_check_and_color_change():
    r = Q.video_self_check(n=8, frames=24, chunk=8, seed=3)
    for k in ("identity_consistency", "frame_adherence", "motion_accuracy", "color_change_accuracy"):
        assert r[k] is None or r[k] >= 0.95, r
    o = D.Obj("square", "red", "large", 0.5, 0.5)
    vs = D.VideoScene([o], [D.Motion("turn", to_color="blue", t0=6)], "white",
                      "a large red square turning blue on a white background")
    v = D.render_video_uint8(vs, 20)
    assert Q.video_metrics(v, vs.caption, [10])["color_change_accuracy"] == 1.0
    assert Q.video_metrics(v[::-1], vs.caption, [10])["color_change_accuracy"] == 0.0


def test_cli(capsys):
    assert Q.main(["self-check", "--n", "20"]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_served_adherence_scores_what_the_engine_makes(capsys):
    """``served``: the embedded models through the engine, on prompts stripped of their background (completed by
    the checkpoints); the frame counts are what was asked, and the scores are real adherence reports."""
    import json
    assert Q.main(["served", "--n", "4", "--no-background"]) == 0
    img = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert img["n"] == 4 and img["steps"] == 1 and img["no_background"] and 0.0 <= img["accuracy"] <= 1.0
    assert Q.main(["served", "--video", "--n", "2", "--frames", "6"]) == 0
    vid = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert vid["n"] == 12 and vid["frames"] == 6 and "shapes" in vid
