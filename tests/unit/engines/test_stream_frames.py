"""Video-to-video in the moving buffer, driven through EngineCore without HTTP, on the embedded default video model:
a frames session waits for its first input, follows a moving input, is reproducible, and batches with text
sessions; refusals are 400s."""

import numpy as np
import pytest
import torch

from fewstep.engines.config import EngineConfig
from fewstep.engines.core import EngineCore, EngineError
from fewstep.engines.loading import load_checkpoint
from fewstep.engines.stream import StreamPipeline, StreamStart
from fewstep.server.config import DEFAULT_VIDEO_MODEL_DIR

PROMPT = "a white square on a black background"


@pytest.fixture(scope="module")
def core():
    torch.set_num_threads(1)
    return EngineCore({"v": StreamPipeline(load_checkpoint(DEFAULT_VIDEO_MODEL_DIR))}, EngineConfig())


def square(t: int, period: int = 24) -> np.ndarray:
    img = np.zeros((32, 32, 3), np.uint8)
    x = round(2 + (t % period) * 22 / (period - 1))
    img[12:20, x: x + 8] = 255
    return img


def centroid_x(img: np.ndarray) -> float:
    g = img.astype(float).mean(-1)
    w = np.clip(g - (g.min() + g.max()) / 2, 0, None)
    return float((w.sum(0) * np.arange(32)).sum() / max(w.sum(), 1e-9))


def run(core, steps: int, frame_at, strength=0.6, seed=1, extra_text=False):
    """Step a frames session ``steps`` times, giving it ``frame_at(step)`` before each step; returns its frames."""
    s = core.open_stream(StreamStart(prompt=PROMPT, model="v", seed=seed, fps=0, format="raw", input="frames",
                                     strength=strength))
    t = core.open_stream(StreamStart(prompt="a red circle", model="v", seed=5, fps=0, format="raw")) \
        if extra_text else None
    out, batches = [], []
    try:
        for step in range(steps):
            core.set_input_frame(s.id, frame_at(step), step)
            core.stream_step()
            batches.append(s.last_batch)
            while (c := s.owner.take()) is not None:
                out.extend((step, f) for f in c.frames)
    finally:
        core.close_stream(s.id)
        if t is not None:
            core.close_stream(t.id)
    return out, batches


def test_waits_for_its_first_input_frame(core):
    s = core.open_stream(StreamStart(prompt=PROMPT, model="v", seed=1, fps=0, format="raw", input="frames"))
    try:
        assert core.stream_step() == [] and s.steps == 0  # not runnable without input
        core.set_input_frame(s.id, square(0), 0)
        core.stream_step()
        assert s.steps == 1
        old = s.input_frame
        core.set_input_frame(s.id, square(5), -1)  # an older frame decoded late never replaces a newer one
        assert s.input_frame is old
    finally:
        core.close_stream(s.id)


def test_output_follows_a_moving_input_and_not_a_frozen_one(core):
    moving, _ = run(core, 30, square)
    frozen, _ = run(core, 30, lambda step: square(0))
    for frames, expect in ((moving, True), (frozen, False)):
        xs = np.array([centroid_x(f) for _, f in frames])
        lagged = np.array([centroid_x(square(max(step - 3, 0))) for step, _ in frames])
        corr = np.corrcoef(xs, lagged)[0, 1] if xs.std() > 0 else 0.0
        assert (corr > 0.7 and np.ptp(xs) > 8) == expect, (expect, corr, xs.round(1))


def test_reproducible_and_batches_with_text_sessions(core):
    a, _ = run(core, 8, square, seed=4)
    b, batches = run(core, 8, square, seed=4, extra_text=True)
    assert max(batches) == 2  # the frames session and the text session shared forward passes
    assert len(a) == len(b) > 0
    for (_, x), (_, y) in zip(a, b):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


def test_strength_one_ignores_the_input(core):
    red, _ = run(core, 6, lambda step: np.full((32, 32, 3), (255, 0, 0), np.uint8), strength=1.0)
    blue, _ = run(core, 6, lambda step: np.full((32, 32, 3), (0, 0, 255), np.uint8), strength=1.0)
    for (_, x), (_, y) in zip(red, blue):
        np.testing.assert_array_equal(x, y)


def test_refusals(core):
    with pytest.raises(EngineError, match="strength") as e:
        core.open_stream(StreamStart(prompt=PROMPT, model="v", input="frames", strength=0.0))
    assert e.value.status == 400
    with pytest.raises(EngineError, match="input"):
        core.open_stream(StreamStart(prompt=PROMPT, model="v", input="pictures"))
    s = core.open_stream(StreamStart(prompt=PROMPT, model="v", input="frames"))
    try:
        with pytest.raises(EngineError, match="strength"):
            core.update_strength(s.id, 1.5)
        core.update_strength(s.id, 0.3)
        assert s.strength == 0.3
    finally:
        core.close_stream(s.id)
