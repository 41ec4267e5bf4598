"""Streaming video training on the CPU (--tiny): export format, engine round trip, mixed partitioning,
per-frame timesteps, resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from training import data
from training.video import (
    KIND_PARTITION,
    KIND_RAMP,
    KIND_STEADY,
    KIND_UNIFORM,
    DataSpec,
    SigmaSpec,
    VideoDistillArgs,
    VideoTeacherArgs,
    distill_video,
    engine_ladder,
    generate_streams,
    ladder_state_levels,
    load_video_export,
    mixed_sigmas,
    render_work,
    train_video_teacher,
    video_flow_loss,
    video_work,
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fewstep_video")
    t = train_video_teacher(VideoTeacherArgs(out=str(out), tiny=True, device="cpu", max_steps=2,
                                             budget_start=time.time()))
    assert t == out / "video_teacher"
    s = distill_video(VideoDistillArgs(teacher=str(t), out=str(out), tiny=True, device="cpu", max_steps=2,
                                       budget_start=time.time()))
    assert s == out / "video_student"
    return out


def test_export_format(run_dir):
    from safetensors import safe_open
    for name in ("video_teacher", "video_student"):
        d = run_dir / name
        idx = json.loads((d / "model_index.json").read_text())
        assert idx["_class_name"] == "FewstepStreamPipeline"
        assert idx["transformer"] == ["fewstep", "StreamDiTModel"]
        assert idx["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        fs = idx["fewstep"]
        assert fs["kind"] == "video" and fs["chunk_frames"] == 2 and fs["buffer_chunks"] == 3
        assert fs["default_size"] == 32 and fs["sigma_ladder"] == pytest.approx(engine_ladder(3), abs=1e-6)
        with safe_open(str(d / "transformer" / "diffusion_pytorch_model.safetensors"), framework="pt") as sf:
            assert all(sf.get_slice(k).get_dtype() == "F16" for k in sf.keys())  # noqa: SIM118
    assert json.loads((run_dir / "video_student" / "model_index.json").read_text())["fewstep"][
        "default_guidance_scale"] == 0.0
    assert not list(run_dir.rglob("*.pt")) and not list(run_dir.rglob("*.bin"))
    log = [json.loads(x) for x in (run_dir / "video_distill_log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in log) and any(r.get("event") == "exported" for r in log)
    assert {r["guidance"] for r in log if r.get("event") == "guidance_search"} == {1.0, 3.0}


def test_engine_streams_student_like_reference_sampler(run_dir):
    """The export loads through the serving loader and the streaming engine; the engine's frames equal
    the reference sampler's (same policy, same per-session noise)."""
    from fewstep.engines.config import EngineConfig, StreamConfig
    from fewstep.engines.core import EngineCore
    from fewstep.engines.loading import load_checkpoint
    from fewstep.engines.stream import StreamPipeline, StreamStart

    d = run_dir / "video_student"
    pipe = StreamPipeline(load_checkpoint(d))
    assert pipe.sigmas == pytest.approx(engine_ladder(pipe.buffer_chunks), abs=1e-6)
    with torch.no_grad():   # the 2-step tiny student is ~0: give the comparison something to compare
        g = torch.Generator().manual_seed(0)
        for p in (pipe.denoiser.proj_out.weight, pipe.denoiser.time_mod[1].weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    core = EngineCore({"video": pipe}, EngineConfig(stream=StreamConfig()))
    prompt = "a red circle moving left on a white background"
    s = core.open_stream(StreamStart(prompt=prompt, seed=7, fps=0, format="raw"))
    chunks = []
    for _ in range(20):
        core.stream_step()
        while (c := s.owner.take()) is not None:
            chunks.append(c)
        if len(chunks) >= 3:
            break
    assert len(chunks) >= 3 and [c.first_index for c in chunks[:3]] == [0, 2, 4]
    engine = np.concatenate([c.frames for c in chunks[:3]])           # [6, 32, 32, 3]

    model, tok, _ = load_video_export(d, "cpu")
    with torch.no_grad():
        model.transformer.load_state_dict(pipe.denoiser.state_dict())
    ref, timing = generate_streams(model, tok, [prompt], [7], 6, K=3, F=2, size=32)
    assert ref.shape == (1, 6, 32, 32, 3) and timing["model_calls_per_step"] == 1
    assert np.abs(ref[0].numpy().astype(int) - engine.astype(int)).max() <= 1
    assert engine.std() > 0


def test_mixed_partitioning_properties():
    K, F = 4, 2
    spec = SigmaSpec(p_uniform=0.2, p_ladder=0.2)
    sig, kinds = mixed_sigmas(np.random.default_rng(0), 2000, K, F, spec)
    assert sig.shape == (2000, K * F) and sig.dtype == np.float32
    assert (np.diff(sig, axis=1) >= 0).all()                           # monotone: noise grows front -> back
    assert (sig >= spec.min_sigma).all() and (sig <= 1.0).all()
    for k in (KIND_PARTITION, KIND_UNIFORM, KIND_RAMP, KIND_STEADY):
        assert (kinds == k).sum() > 50, k
    uni = sig[kinds == KIND_UNIFORM]
    assert (uni == uni[:, :1]).all()                                   # one level for the whole window
    part = sig[kinds == KIND_PARTITION]
    assert (part[:, 0] < part[:, -1]).mean() > 0.95                    # staggered
    engine_chunks = part.reshape(len(part), K, F)
    assert ((engine_chunks == engine_chunks[..., :1]).all(-1)).all(-1).mean() > 0.4   # F-frame chunks (+ coarser)
    lad = engine_ladder(K)
    steady = sig[kinds == KIND_STEADY]
    assert np.allclose(steady, np.repeat([lad[lv] for lv in ladder_state_levels(K, K - 1)], F))
    assert np.allclose(steady[0], np.repeat([0.25, 0.5, 0.75, 1.0], F))
    ramps = {tuple(r) for r in sig[kinds == KIND_RAMP]}
    assert tuple(np.ones(K * F, np.float32)) in ramps                  # the engine's first (all-noise) step
    assert len(ramps) == K - 1


def test_per_frame_timesteps_reach_model():
    from training.model import build_tokenizer, tokenize
    from training.video import VIDEO_PRESETS, build_video_model

    cfg = VIDEO_PRESETS["tiny"]
    tok = build_tokenizer(data.vocabulary(), 32)
    model = build_video_model(cfg, len(tok))
    seen = []
    model.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"].clone()),
                                                with_kwargs=True)
    sig, _ = mixed_sigmas(np.random.default_rng(1), 3, cfg.buffer_chunks, cfg.chunk_frames,
                          SigmaSpec(p_uniform=0.0, p_ladder=0.0))
    sig = torch.from_numpy(sig)
    ids, mask = tokenize(tok, ["a red circle on a white background"] * 3)
    x0 = torch.rand(3, cfg.frames, 3, 32, 32) * 2 - 1
    loss = video_flow_loss(model, x0, ids, mask, torch.randn_like(x0), sig, False, 4.0)
    assert torch.isfinite(loss)
    (ts,) = seen
    assert ts.shape == (3, cfg.frames) and torch.allclose(ts, sig * 1000.0)
    assert (ts[:, -1] > ts[:, 0]).all()


def test_render_work_matches_render_video():
    from training.model import build_tokenizer
    tok = build_tokenizer(data.vocabulary(), 32)
    w = video_work(3, 5, 6, 4, 2, "train", SigmaSpec(), DataSpec(flip=False), tok.get_vocab(), 32)
    x = render_work(w, 32, "cpu")
    rng = np.random.default_rng([3, 5, 77])
    mixed_sigmas(rng, 6, 4, 2, SigmaSpec())                            # same draw order as video_work
    rng.random(6), rng.integers(1, 97, 6)
    scenes = [data.sample_video_scene(rng, "train") for _ in range(6)]
    for b, vs in enumerate(scenes):
        ref = data.render_video([vs], 8, 32, start_frame=int(w["start"][b]))[0]
        assert torch.allclose(x[b], ref, atol=1e-6)
    assert w["ids"].shape == (6, 32)


def test_resume_continues_step(run_dir):
    st = json.loads((run_dir / "video_teacher_ckpt" / "state.json").read_text())
    assert st["step"] == 2 and all(f.endswith(".safetensors") for f in st["shards"])
    train_video_teacher(VideoTeacherArgs(out=str(run_dir), tiny=True, device="cpu", max_steps=3, resume=True,
                                         budget_start=time.time()))
    st2 = json.loads((run_dir / "video_teacher_ckpt" / "state.json").read_text())
    assert st2["step"] == 3 and st2["generation"] > st["generation"]
    log = [json.loads(x) for x in (run_dir / "video_teacher_log.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" and r["step"] == 2 for r in log)
    assert [r["step"] for r in log if "loss" in r and r.get("event") is None][-1] == 3


def test_video_eval_tiny(run_dir):
    from training.video import VideoEvalArgs, video_evaluate
    res = video_evaluate(VideoEvalArgs(model=str(run_dir / "video_student"), teacher=str(run_dir / "video_teacher"),
                                       tiny=True, device="cpu"))
    row, trow = res["rows"]
    assert row["K"] == 3 and row["F"] == 2 and row["model_calls_per_emitted_chunk"] == 1
    fs = json.loads((run_dir / "video_student" / "model_index.json").read_text())["fewstep"]
    assert trow["guidance"] == fs["teacher_guidance_scale"] and trow["substeps"] == fs["teacher_substeps"]
    assert {"identity_consistency", "chunk_adherence", "frame_adherence"} <= set(row)
    assert (run_dir / "video_eval.json").exists() and (run_dir / "video_strip.png").exists()
