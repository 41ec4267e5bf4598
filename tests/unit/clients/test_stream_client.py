"""Client-side stream pieces without a server: the binary header (kept in sync with the server's), URLs,
message builders and gap accounting."""

import json

import pytest

from fewstep.clients import python as sdk
from fewstep.server import stream_protocol as proto


def test_frame_header_matches_the_server():
    assert sdk.FRAME_HEADER.format == proto.FRAME_HEADER.format and sdk.FRAME_HEADER.size == 24
    assert sdk.FRAME_MAGIC == proto.FRAME_MAGIC
    assert {v: k for k, v in proto.PAYLOAD_TYPES.items()} == sdk.PAYLOAD_NAMES
    data = proto.pack_frame(b"\xff\xd8jpeg", "jpeg", 2**40 + 3, 12.5, prompt_version=70000)
    f = sdk.parse_frame(data, "sid", received_at=1.0)
    assert (f.index, f.format, f.timestamp_ms, f.prompt_version, f.data, f.session_id) == (
        2**40 + 3, "jpeg", 12.5, 70000 & 0xFFFF, b"\xff\xd8jpeg", "sid")
    head, payload = proto.unpack_frame(data)
    assert head["index"] == 2**40 + 3 and payload == b"\xff\xd8jpeg"
    with pytest.raises(sdk.FewstepError, match="FSTR"):
        sdk.parse_frame(b"X" * 30)
    with pytest.raises(sdk.FewstepError, match="shorter"):
        sdk.parse_frame(b"FSTR")


def test_ws_url_and_messages():
    assert sdk.ws_url("http://h:8000/v1", "/v1/stream") == "ws://h:8000/v1/stream"
    assert sdk.ws_url("https://h", "/v1/realtime") == "wss://h/v1/realtime"
    assert sdk.ws_url("h:9", "/x") == "ws://h:9/x"
    msg = sdk.build_start_message("a cat", size=(64, 32), seed=3, fps=0)
    assert msg == {"type": "start", "prompt": "a cat", "format": "jpeg", "size": "64x32", "seed": 3, "fps": 0}
    proto.CLIENT_MESSAGE.validate_python(msg)  # what the client builds, the server accepts
    rt = sdk.build_realtime_input("x", seed=1, size=64, request_id="r1")
    assert rt["request_id"] == "r1" and proto.RealtimeRequest.model_validate(rt).size == 64
    assert proto.VideoRequest.model_validate(sdk.build_video_body("x", num_frames=8, size=(32, 32))).num_frames == 8


def test_stream_state_counts_gaps_and_raises_on_failure():
    st = sdk._StreamState({"session_id": "s", "type": "started"})
    for i in (0, 1, 4, 5, 9):
        st.on_frame(proto.pack_frame(b"x", "jpeg", i, 0.0))
    assert st.frames_received == 5 and st.frames_missing == 5
    assert st.on_text(json.dumps({"type": "stats", "frames_sent": 5})) is False and st.stats["frames_sent"] == 5
    assert st.on_text(json.dumps({"type": "error", "message": "bad", "code": "invalid_message"})) is False
    assert st.error.code == "invalid_message"
    with pytest.raises(sdk.FewstepError, match="boom"):
        st.on_text(json.dumps({"type": "error", "message": "boom", "code": "stream_failed"}))
    assert st.on_text(json.dumps({"type": "stopped", "reason": "stopped"})) is True
    with pytest.raises(sdk.FewstepError, match="started"):
        sdk._await_started(json.dumps({"type": "stats"}))
    with pytest.raises(sdk.FewstepError, match="loading") as e:
        sdk._await_started(json.dumps({"type": "error", "message": "still loading", "code": "not_ready"}))
    assert e.value.code == "not_ready"


def test_the_client_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, fewstep.clients.python, fewstep.clients.bench_stream; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
