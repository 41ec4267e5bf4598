"""Message types of the streaming surfaces: one pydantic model per type, helpful errors, a published schema."""

import json

import pytest
from pydantic import ValidationError

from fewstep.server import stream_protocol as proto


def test_client_messages_parse_by_type():
    m = proto.CLIENT_MESSAGE.validate_json('{"type": "start", "prompt": "a cat", "size": "64x32", "fps": 0}')
    assert isinstance(m, proto.StartMessage) and proto.parse_size(m.size) == (64, 32) and m.format == "jpeg"
    assert isinstance(proto.CLIENT_MESSAGE.validate_json('{"type": "update", "prompt": "b"}'), proto.UpdateMessage)
    assert isinstance(proto.CLIENT_MESSAGE.validate_json('{"type": "stop"}'), proto.StopMessage)
    # an update may change NAG's parameters alone
    m = proto.CLIENT_MESSAGE.validate_json('{"type": "update", "nag_scale": 4}')
    assert m.changes_guidance() and m.nag_fields() == {"nag_scale": 4.0, "nag_tau": None, "nag_alpha": None}


@pytest.mark.parametrize("raw,needle", [
    ('{"type": "start", "prompt": " "}', "non-empty"),
    ('{"type": "start", "prompt": "x", "size": "big"}', 'size must look like "512x512"'),
    ('{"type": "start", "prompt": "x", "size": 8}', "at least 16 pixels"),
    ('{"type": "start", "prompt": "x", "format": "gif"}', "jpeg"),
    ('{"type": "start", "prompt": "x", "extra": 1}', "Extra inputs"),
    ('{"type": "nope"}', "does not match"),
    ('{"prompt": "x"}', "discriminator"),
    ('{"type": "start", "prompt": "x", "nag_tau": 0.5}', "nag_tau must be from 1 to 10, got 0.5"),
    ('{"type": "update", "nag_alpha": 2}', "nag_alpha must be from 0 to 1, got 2"),
])
def test_bad_client_messages(raw, needle):
    with pytest.raises(ValidationError) as e:
        proto.CLIENT_MESSAGE.validate_json(raw)
    assert needle in str(e.value)


def test_server_messages_serialise_with_their_type():
    assert json.loads(proto.StoppedMessage(reason="stopped", frames_sent=3, frames_dropped=0).model_dump_json())[
        "type"] == "stopped"
    assert json.loads(proto.RealtimeDropped(request_id="r").model_dump_json()) == {
        "type": "dropped", "request_id": "r", "reason": "superseded"}


def test_schema_lists_every_message_and_the_header():
    s = json.dumps(proto.schema())
    for t in ("start", "update", "stop", "started", "init", "updated", "stats", "error", "stopped", "result",
              "dropped"):
        assert f'"const": "{t}"' in s, t
    header = proto.schema()["stream"]["binary_frame"]
    assert header["header_bytes"] == proto.FRAME_HEADER.size == 24
    assert [f["offset"] for f in header["fields"]] == [0, 4, 5, 6, 8, 16]
