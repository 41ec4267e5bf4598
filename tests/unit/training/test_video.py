"""Streaming video training on the CPU (--tiny): export format, engine round trip, mixed partitioning,
per-frame timesteps, resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fewstep.training import data
from fewstep.training.video import (
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
        assert idx["transformer"] == ["fewstep", "StreamUNetModel"]   # the default preset's architecture
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
        zeroed = [p for p in pipe.denoiser.parameters() if p.dim() > 1 and p.abs().max() < 1e-3]
        assert zeroed   # the output projection and the frame attentions' outputs start at zero
        for p in zeroed:
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
    from fewstep.training.model import build_tokenizer, tokenize
    from fewstep.training.video import VIDEO_PRESETS, build_video_model

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
    from fewstep.training.model import build_tokenizer
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
    from fewstep.training.video import VideoEvalArgs, video_evaluate
    res = video_evaluate(VideoEvalArgs(model=str(run_dir / "video_student"), teacher=str(run_dir / "video_teacher"),
                                       tiny=True, device="cpu"))
    row, trow = res["rows"]
    assert row["K"] == 3 and row["F"] == 2 and row["model_calls_per_emitted_chunk"] == 1
    fs = json.loads((run_dir / "video_student" / "model_index.json").read_text())["fewstep"]
    assert trow["guidance"] == fs["teacher_guidance_scale"] and trow["substeps"] == fs["teacher_substeps"]
    assert {"identity_consistency", "chunk_adherence", "frame_adherence"} <= set(row)
    assert all(0.0 <= r["diversity"] <= 1.0 and "diversity_second_half" in r for r in (row, trow))
    assert (run_dir / "video_eval.json").exists() and (run_dir / "video_strip.png").exists()


def test_chunk_diversity_compares_seeds_chunk_by_chunk():
    """Identical streams score 0; streams that differ only in the second half score 0 there and > 0 after."""
    from fewstep.training.video import chunk_diversity
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (1, 8, 4, 4, 3), dtype=np.uint8)
    same = np.repeat(base, 3, axis=0)
    assert chunk_diversity(same, 2) == {"diversity": 0.0, "diversity_first_half": 0.0, "diversity_second_half": 0.0}
    late = same.copy()
    late[1, 4:] = 255 - late[1, 4:]                  # seed 1 departs from frame 4 on (chunks 2 and 3 of 4)
    d = chunk_diversity(late, 2)
    assert d["diversity_first_half"] == 0.0 and d["diversity_second_half"] > 0.1
    assert d["diversity"] == pytest.approx(d["diversity_second_half"] / 2, abs=1e-3)


# ----------------------------------------------------------------------------------------------
# Video distillation: replayed teacher targets, determinism, resume, one compilation
# ----------------------------------------------------------------------------------------------

def _distill_log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "video_distill_log.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _distill_log(out) if "loss" in r and r.get("event") is None]


def test_replay_buffer_fifo_and_sampling():
    from fewstep.training.video import ReplayBuffer
    rb = ReplayBuffer(5)
    rb.add(a=torch.arange(3), b=torch.arange(3)[:, None].float() * torch.ones(3, 2))
    assert rb.size == 3 and rb.added == 3
    rb.add(a=torch.arange(3, 6), b=torch.arange(3, 6)[:, None].float() * torch.ones(3, 2))
    assert rb.size == 5 and rb.added == 6
    assert sorted(rb.data["a"].tolist()) == [1, 2, 3, 4, 5]            # FIFO: sample 0 was overwritten
    g = torch.Generator().manual_seed(3)
    s = rb.sample(4, g)
    assert len(set(s["a"].tolist())) == 4                               # distinct samples
    assert torch.equal(s["b"][:, 0], s["a"].float()) and torch.equal(s["b"][:, 1], s["a"].float())  # rows aligned
    assert torch.equal(rb.sample(4, torch.Generator().manual_seed(3))["a"], s["a"])   # a function of the seed
    with pytest.raises(ValueError):
        rb.sample(6, g)


def test_video_distill_reuses_teacher_targets(run_dir, tmp_path, monkeypatch):
    """One teacher rollout (all streams, substeps x CFG forwards) per `steps_per_rollout` optimizer steps."""
    import fewstep.training.video as V
    calls = []
    real = V.euler_update

    def counting(model, *a, **kw):
        upd = real(model, *a, **kw)

        def f(x, sig, nxt):
            calls.append(x.shape[0])
            return upd(x, sig, nxt)
        return f
    monkeypatch.setattr(V, "euler_update", counting)
    out = tmp_path / "reuse"
    distill_video(VideoDistillArgs(teacher=str(run_dir / "video_teacher"), out=str(out), tiny=True, device="cpu",
                                   guidance=3.0, streams=4, batch=3, steps_per_rollout=3, max_steps=7,
                                   budget_start=time.time()))
    assert calls == [4, 4, 4]                                           # rollouts before steps 1, 4 and 7
    log = _distill_log(out)
    ro = [r for r in log if r.get("event") == "rollout"]
    assert [r["step"] for r in ro] == [0, 3, 6]
    assert all(r["teacher_forwards"] == 4 * 1 * 2 for r in ro)          # tiny: 1 sub-step, CFG -> 2 calls
    assert [r["replay"] for r in ro] == [4, 8, 12]
    assert [s for s, _ in _losses(out)] == list(range(1, 8))
    fin = [r for r in log if r.get("event") == "rollouts"][-1]
    assert fin["rollouts"] == 3 and fin["targets"] == 12                # 7 steps x 3 samples from 12 targets
    st = json.loads((out / "video_distill_ckpt" / "state.json").read_text())
    assert st["extra"]["rollouts"] == 3 and st["steps_per_rollout"] == 3


def test_video_distill_deterministic_and_resume(run_dir, tmp_path):
    from safetensors.torch import load_file

    def run(name: str, max_steps: int, resume: bool = False, seed: int = 0) -> Path:
        out = tmp_path / name
        distill_video(VideoDistillArgs(teacher=str(run_dir / "video_teacher"), out=str(out), tiny=True,
                                       device="cpu", guidance=3.0, max_steps=max_steps, resume=resume, seed=seed,
                                       budget_start=time.time()))
        return out

    a, b = run("a", 4), run("b", 4)
    assert _losses(a) == _losses(b) and len(_losses(a)) == 4            # same seed, same run
    wa = load_file(str(a / "video_student" / "transformer" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(b / "video_student" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _losses(run("c", 4, seed=1)) != _losses(a)

    st = json.loads((b / "video_distill_ckpt" / "state.json").read_text())
    assert st["step"] == 4 and st["extra"]["rollouts"] == 2 and st["extra"]["guidance"] == 3.0
    run("b", 6, resume=True)
    st2 = json.loads((b / "video_distill_ckpt" / "state.json").read_text())
    assert st2["step"] == 6 and st2["generation"] > st["generation"]
    assert st2["extra"]["rollouts"] == 3                                # counters continue (rollout seeds too)
    log = _distill_log(b)
    assert any(r.get("event") == "resume" and r["step"] == 4 for r in log)
    assert [s for s, _ in _losses(b)][-2:] == [5, 6]


def test_compiled_steps_compile_once():
    """With the position cache filled first (warm_position_cache), the compiled video steps are compiled
    once: no recompilation on the second call (the H200 runs paid a second full compile there)."""
    from fewstep.training.model import build_tokenizer, tokenize
    from fewstep.training.video import (
        VIDEO_PRESETS,
        build_video_model,
        distill_loss,
        warm_position_cache,
    )

    cfg = VIDEO_PRESETS["tiny"]
    tok = build_tokenizer(data.vocabulary(), 32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        model = build_video_model(cfg, len(tok)).train()
        warm_position_cache(model, cfg, False)
        step = torch.compile(distill_loss, backend=backend, dynamic=False)
        opt = torch.optim.AdamW(model.parameters(), 1e-3)
        for i in range(3):
            g = torch.Generator().manual_seed(i)
            ids, mask = tokenize(tok, ["a red circle", "a blue square on the left", ""][i:] + [""] * i)
            x = torch.randn(3, 3, cfg.frames, 32, 32, generator=g)
            sig = torch.rand(3, cfg.frames, generator=g)
            loss, _ = step(model, x, sig, sig * 0.5, model.encode(ids, mask), mask, torch.randn(x.shape, generator=g),
                           torch.ones(3, cfg.frames), False)
            loss.backward()
            opt.step()
            opt.zero_grad()
            assert len(graphs) == 1, f"recompiled at call {i + 1}"

        graphs.clear()
        teacher = build_video_model(cfg, len(tok)).train()
        warm_position_cache(teacher, cfg, False)
        tstep = torch.compile(video_flow_loss, backend=backend, dynamic=False)
        for i in range(2):
            x0 = torch.rand(3, cfg.frames, 3, 32, 32) * 2 - 1
            tstep(teacher, x0, ids, mask, torch.randn_like(x0), torch.rand(3, cfg.frames), False, 4.0).backward()
        assert len(graphs) == 1
    finally:
        torch._dynamo.reset()


def test_trainer_rate_skips_slow_first_steps(tmp_path):
    """The step budget comes from the rate after `rate_skip` steps: a slow start (e.g. a recompilation)
    must not shrink it (the H200 video distill froze 43 steps from such a rate and stopped 40 s early)."""
    from fewstep.training.common import Budget
    from fewstep.training.loop import Trainer

    def run(rate_skip: int) -> int:
        model = torch.nn.Linear(4, 4)
        tr = Trainer(name=f"t{rate_skip}", out=tmp_path, model=model, device=torch.device("cpu"),
                     budget=Budget(1.0, time.time()), lr=1e-3, warmup=0, weight_decay=0.0, ema_decay=0.9,
                     batch=1, reserve_s=5.0, max_steps=None, ckpt_every_s=1e9, estimate_after=8,
                     rate_skip=rate_skip, show_bar=False, log_every=100)
        for i in range(9):
            tr.begin_step()
            loss = model(torch.ones(1, 4)).square().mean()
            loss.backward()
            time.sleep(0.3 if i < 3 else 0.01)
            tr.end_step(loss, dict)
            if tr.total_steps is not None:
                break
        return tr.total_steps

    fast, slow = run(3), run(0)
    assert fast > 1500 > slow, (fast, slow)          # ~55 s at ~90 step/s vs a rate diluted by 0.6 s of sleeps


def test_dit_preset_still_trains_exports_and_streams(tmp_path):
    """The StreamDiT of 2026-11-29 (359ae9a) (preset small; --tiny gives its tiny twin) keeps working end to end: teacher,
    distillation onto the moving buffer, export, a resumed teacher, and the engine streaming the student."""
    from fewstep.engines.config import EngineConfig, StreamConfig
    from fewstep.engines.core import EngineCore
    from fewstep.engines.loading import load_checkpoint
    from fewstep.engines.stream import StreamPipeline, StreamStart

    t = train_video_teacher(VideoTeacherArgs(out=str(tmp_path), tiny=True, preset="small", device="cpu", max_steps=2,
                                             budget_start=time.time()))
    assert json.loads((t / "model_index.json").read_text())["transformer"] == ["fewstep", "StreamDiTModel"]
    # a checkpoint written before the UNet keys existed (the StreamDiT's of 2026-11-29) still resumes
    st = tmp_path / "video_teacher_ckpt" / "state.json"
    state = json.loads(st.read_text())
    for k in ("arch", "channels", "level_heads", "joint_tokens"):
        del state["model_config"][k]
    st.write_text(json.dumps(state))
    train_video_teacher(VideoTeacherArgs(out=str(tmp_path), tiny=True, preset="small", device="cpu", max_steps=3,
                                         resume=True, budget_start=time.time()))
    s = distill_video(VideoDistillArgs(teacher=str(t), out=str(tmp_path), tiny=True, device="cpu", max_steps=2,
                                       guidance=1.0, budget_start=time.time()))
    pipe = StreamPipeline(load_checkpoint(s))
    assert type(pipe.denoiser).__name__ == "StreamDiTModel"
    core = EngineCore({"video": pipe}, EngineConfig(stream=StreamConfig()))
    sess = core.open_stream(StreamStart(prompt="a red circle moving left on a white background", seed=1, fps=0,
                                        format="raw"))
    chunk = None
    for _ in range(10):
        core.stream_step()
        if (chunk := sess.owner.take()) is not None:
            break
    core.shutdown()
    assert chunk is not None and chunk.frames.shape == (2, 32, 32, 3)


def test_motion_probe_reads_the_datasets_own_motion(run_dir):
    """training.study motion: on the dataset's videos of its scenes the tracked object moves at the captioned speed
    (0.015-0.03 of the frame per frame) and always the captioned way; the model side runs (a 2-step tiny student
    draws nothing trackable, so its figures are not checked)."""
    from fewstep.training.study import motion_probe

    r = motion_probe(str(run_dir / "video_student"), n=2, frames=12)
    assert len(r["rows"]) == 2 and all(" moving " in row["caption"] and " and " not in row["caption"]
                                       for row in r["rows"])
    assert all(0.012 <= row["data_speed"] <= 0.033 and row["data_motion_accuracy"] == 1.0 for row in r["rows"])
