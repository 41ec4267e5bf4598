"""frame_cost_by_length: per-frame cost over a window ending at each stream length the sessions reached."""

import pytest

from fewstep.clients.bench_stream import SessionRecord, frame_cost_by_length


def test_frame_cost_by_length_windows():
    # frames 5 ms apart for the first 250 frames, then 10 ms apart
    t, arrivals = 0.0, []
    for i in range(600):
        arrivals.append(t)
        t += 0.005 if i < 250 else 0.010
    r = SessionRecord(0, 0, arrivals=arrivals, indices=list(range(600)))
    out = frame_cost_by_length([r])
    assert set(out) == {"100", "200", "500"}  # 1000 was not reached
    assert out["100"] == pytest.approx(5.0) and out["200"] == pytest.approx(5.0) and out["500"] == pytest.approx(10.0)
    short = SessionRecord(1, 1, arrivals=arrivals[:150], indices=list(range(150)))
    assert set(frame_cost_by_length([r, short])) == {"100"}  # every session must reach the length
