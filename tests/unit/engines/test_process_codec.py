"""What crosses the engine-process bridge (engines/process.py), without processes: each model's capabilities and
served sizes, requests (with an input image) and outputs (encoded and raw) come back equal to what was sent."""

import numpy as np
import orjson
import pytest

from fewstep.engines import process as P
from fewstep.engines.config import EngineConfig
from fewstep.engines.core import EngineCore
from fewstep.engines.errors import EngineError
from fewstep.engines.loading import load_checkpoint
from fewstep.engines.pipeline import FewStepPipeline
from fewstep.engines.request import GenerateOutput, GenerateRequest


@pytest.mark.parametrize("name", ["sd_turbo", "pixart", "lcm"])
def test_capabilities_and_sizes_round_trip(tiny_dir, name):
    core = EngineCore({name: FewStepPipeline(load_checkpoint(tiny_dir / name))}, EngineConfig())
    caps, sizes = core.pipelines[name].capabilities, core.sizes[name]
    wire = orjson.loads(orjson.dumps({"c": P._caps_json(caps), "s": P._sizes_json(sizes)}))
    assert P._caps(wire["c"]) == caps
    assert P._sizes(wire["s"]) == sizes and P._sizes(wire["s"]).describe() == sizes.describe()
    core.shutdown()


def test_requests_and_outputs_round_trip():
    img = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    req = GenerateRequest(prompt="a cat", n=2, height=64, width=64, seed=3, image=img, strength=0.4,
                          negative_prompt="red", nasa_scale=1.5, timeout_s=2.0)
    header = {k: getattr(req, k) for k in P._REQ_FIELDS} | {"image_shape": list(img.shape)}
    back = P._request(orjson.loads(orjson.dumps(header)), [img.tobytes()])
    assert np.array_equal(back.image, img)
    assert {k: getattr(back, k) for k in P._REQ_FIELDS} == {k: getattr(req, k) for k in P._REQ_FIELDS}

    for images in ([b"\xff\xd8jpeg-1", b"\xff\xd8jpeg-2"], [img, img[:, ::-1].copy()]):
        out = GenerateOutput("r1", images, [1, 2], {"total_ms": 3.5, "batch_size": 2.0}, model="m", arrival=1.0,
                             done=2.0)
        header, blobs = P._output_message(out)
        h = orjson.loads(orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY))
        assert h["error"] is None and h["seeds"] == [1, 2] and h["timings"]["total_ms"] == 3.5
        if h["arrays"]:
            got = [np.frombuffer(b, np.uint8).reshape(s) for b, s in zip(blobs, h["arrays"])]
            assert all(np.array_equal(a, b) for a, b in zip(got, images))
        else:
            assert blobs == images


def test_errors_keep_their_answer_and_hide_the_rest():
    e = P._error(orjson.loads(orjson.dumps(P._error_json(EngineError("busy", 503, None, "overloaded", 2.5)))))
    assert (str(e), e.status, e.code, e.retry_after) == ("busy", 503, "overloaded", 2.5)
    e = P._error(P._error_json(RuntimeError("CUDA out of memory at /secret/path")))
    assert e.status == 500 and "secret" not in str(e)


def test_stream_starts_sessions_and_chunks_round_trip(tiny_dir):
    from fewstep.engines.stream import StreamPipeline, StreamStart

    pipe = StreamPipeline(load_checkpoint(tiny_dir / "stream_dit"))
    core = EngineCore({"video": pipe}, EngineConfig())
    # the pipeline fields the stream routes read, for video models only
    wire = orjson.loads(orjson.dumps(P._stream_json(pipe)))
    assert wire == {"fps": pipe.fps, "frames_per_chunk": pipe.frames_per_chunk,
                    "first_chunk_frames": pipe.first_chunk_frames, "buffer_chunks": pipe.buffer_chunks}
    start = StreamStart(prompt="a red ball", seed=5, fps=0, format="jpeg", quality=70, input="frames", strength=0.4,
                        negative_prompt="blue", nasa_scale=0.7, max_frames=12, on_full="pause")
    back = StreamStart(**orjson.loads(orjson.dumps(P._start_json(start))))
    # the engine process ships raw frames (the server encodes); every other field as sent, the arrival time included
    assert back.format == "raw" and {**vars(back), "format": start.format} == vars(start)
    s = core.open_stream(StreamStart(prompt="a red ball", seed=5, fps=0, format="raw"))
    fields = orjson.loads(orjson.dumps(P._session_json(s)))
    assert fields == {k: getattr(s, k) for k in P._SESSION_FIELDS} and fields["seed"] == 5
    while s.frames_generated < 2 * pipe.frames_per_chunk:
        core.stream_step()
    chunk = s.owner.take()
    header, blobs = P._chunk_message(7, "video", chunk, s.stats())
    h = orjson.loads(orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY))
    got = P._chunk(s.id, h, [bytes(b) for b in blobs])
    assert h["oid"] == 7 and h["stats"] == s.stats() and h["model"] == "video"
    assert np.array_equal(got.frames, chunk.frames) and got.frames.dtype == np.uint8
    for k in ("session_id", "first_index", "timings", "created", "prompt_version", "final"):
        assert getattr(got, k) == getattr(chunk, k), k
    # encoding happens on the receiving side, from the same pixels: the same bytes
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert got.encoded("jpeg", 85, pool.submit).result() == chunk.encoded("jpeg", 85, pool.submit).result()
    core.shutdown()
