"""Wan2.1-architecture streams: per-frame noise levels as per-token timesteps, latent chunks through the causal
video VAE, served by the same moving-buffer scheduler as our own StreamDiT."""

import numpy as np
import pytest
import torch

from fewstep.engines.config import EngineConfig, StreamConfig
from fewstep.engines.core import EngineCore
from fewstep.engines.loading import CheckpointError, load_checkpoint
from fewstep.engines.pipeline import FewStepPipeline
from fewstep.engines.stream import StreamPipeline
from fewstep.engines.stream.session import StreamStart


@pytest.fixture(scope="module")
def wan(tiny_dir):
    return StreamPipeline(load_checkpoint(tiny_dir / "wan_stream"))


def test_wan_checkpoint_facts(wan):
    assert wan.family == "wan" and wan.vae_scale_factor == 4 and wan.size_multiple == 8
    # the tiny VAE is 2x in time: a session's first chunk 1 + 2 (F - 1) frames, later ones 2 F
    assert wan.first_chunk_frames == 1 + 2 * (wan.chunk_frames - 1) and wan.frames_per_chunk == 2 * wan.chunk_frames
    prompts = ["a", "a much longer prompt about a blue square moving left"]
    n = wan.tokenize(prompts)["mask"].sum(1).tolist()
    emb = wan.encode_prompt(prompts)
    assert emb.mask is None and emb.embeds.shape[:2] == (2, 16) and n[0] < 16
    assert torch.all(emb.embeds[0, n[0]:] == 0) and torch.all(emb.embeds[0, :n[0]].abs().sum(-1) > 0)
    assert torch.all(emb.embeds[1].abs().sum(-1) > 0)  # padding zeroed, as WanPipeline does


def test_image_pipeline_refuses_a_wan_checkpoint(tiny_dir):
    with pytest.raises(CheckpointError, match="video model"):
        FewStepPipeline(load_checkpoint(tiny_dir / "wan_stream"))


def test_per_token_timesteps_equal_the_scalar_call_when_levels_agree(wan):
    """With one level for every frame, the per-token path must reproduce Wan's ordinary scalar-timestep call; with
    different levels, the output must depend on them (the levels reach the model)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 8, 8, generator=g)
    cond = wan.encode_prompt(["a", "b"])
    sig = torch.full((2, 6), 0.6)
    nxt = torch.full((2, 6), 0.35)
    got = wan.denoise_step(x, sig, nxt, cond)
    v = wan.denoiser(x, timestep=torch.full((2,), 600.0), encoder_hidden_states=cond.embeds, return_dict=False)[0]
    torch.testing.assert_close(got, x + (0.35 - 0.6) * v, atol=1e-5, rtol=1e-5)

    ladder = torch.tensor([[0.25, 0.25, 0.5, 0.5, 0.75, 0.75]] * 2)
    other = wan.denoise_step(x, ladder, ladder, cond)  # sigma_next == sigma: x unchanged whatever v is
    assert torch.equal(other, x)
    v2 = wan.denoiser(x, timestep=wan.wan_timesteps(ladder, x.shape), encoder_hidden_states=cond.embeds,
                      return_dict=False)[0]
    assert (v2 - v).abs().mean() > 1e-3


def test_wan_decode_matches_the_diffusers_recipe(wan):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 2, 8, 8, generator=g)
    frames = wan.decode_frames(z)
    assert frames.shape == (1, 3, 32, 32, 3) and frames.dtype == torch.uint8
    mean = torch.tensor(wan.vae.config.latents_mean).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(wan.vae.config.latents_std).view(1, 4, 1, 1, 1)
    ref = wan.vae.decode(z / inv_std + mean, return_dict=False)[0]  # WanPipeline's de-normalisation
    ref = ((ref / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    assert torch.equal(frames, ref)


def test_wan_stream_through_the_engine(wan):
    core = EngineCore({"wan": wan}, EngineConfig())
    s = core.open_stream(StreamStart(prompt="a green triangle moving right", model="wan", seed=3, fps=0,
                                     format="raw"))
    chunks = []
    for _ in range(40):
        chunks += core.stream_step()
        while s.owner.take() is not None:  # drain the outbox as a client would
            pass
        if len(chunks) >= 3:
            break
    core.close_stream(s.id)
    core.shutdown()
    assert len(chunks) >= 3
    sizes = [c.frames.shape[0] for c in chunks]
    assert sizes == [wan.first_chunk_frames] + [wan.frames_per_chunk] * (len(chunks) - 1)
    idx = [c.first_index for c in chunks]
    assert idx == [sum(sizes[:i]) for i in range(len(chunks))]  # no gaps
    for c in chunks:
        assert c.frames.shape[1:] == (32, 32, 3)
    assert s.decoder_state is None  # closing the stream frees the decoder cache


@pytest.mark.parametrize("ramp", ["trim", "jump"])
def test_cheap_ramps_run_wan_on_the_moving_chunks_alone(wan, ramp):
    """Wan takes a buffer of any length (3-D RoPE over the frames it is given): a trimmed ramp step runs the
    transformer on the front chunks that move, and the stream starts earlier (jump) or with less work (trim)."""
    K, F = wan.buffer_chunks, wan.chunk_frames
    seen = []
    h = wan.denoiser.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["hidden_states"] if "hidden_states" in kw else a[0]).shape[2]),
        with_kwargs=True)
    core = EngineCore({"wan": wan}, EngineConfig(stream=StreamConfig(ramp=ramp)))
    try:
        s = core.open_stream(StreamStart(prompt="a green triangle moving right", model="wan", seed=3, fps=0,
                                         format="raw"))
        chunks = []
        for _ in range(10):
            chunks += core.stream_step()
            if len(chunks) >= 2:
                break
            while s.owner.take() is not None:
                pass
    finally:
        h.remove()
        core.shutdown()
    ramp_steps = [(K - 1 - r) * F for r in range(K - 1)] if ramp == "trim" else [(K - 1) * F]
    assert seen == ramp_steps + [K * F] * (len(seen) - len(ramp_steps))  # then whole buffers, as the full ramp
    assert [c.frames.shape[0] for c in chunks] == [wan.first_chunk_frames, wan.frames_per_chunk]
    assert all(np.isfinite(c.frames).all() for c in chunks)


def test_continuing_decode_equals_one_decode_call(wan):
    """Chunk by chunk with the causal cache carried over == the whole clip in one vae.decode: no seams. Two
    sessions batched (stacked caches) == each decoded alone."""
    from fewstep.engines.stream.wan_vae import decode_continuing

    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 5, 8, 8, generator=g)
    full = wan.vae.decode(z, return_dict=False)[0]  # [2, 3, 1 + 2 * 4, 32, 32]
    parts, states = [], [None, None]
    for a, b in ((0, 2), (2, 4), (4, 5)):
        video, states = decode_continuing(wan.vae, z[:, :, a:b], states)
        parts.append(video)
    assert [p.shape[2] for p in parts] == [3, 4, 2]  # first chunk 1 + 2 (F - 1), then 2 F (the tiny VAE is 2x)
    torch.testing.assert_close(torch.cat(parts, 2), full, atol=1e-5, rtol=1e-5)
    alone, st = decode_continuing(wan.vae, z[1:, :, :2], [None])
    alone2, _ = decode_continuing(wan.vae, z[1:, :, 2:4], st)
    torch.testing.assert_close(alone2, parts[1][1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="separate batches"):
        decode_continuing(wan.vae, z[:, :, :1], [None, st[0]])


def test_sessions_in_different_phases_share_one_decode_call(wan):
    class Session:
        decoder_state = None

    old, new = Session(), Session()
    z = torch.randn(2, 4, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    wan.decode_frames(z[:1], sessions=[old])  # old has emitted once: its next chunk continues
    out = wan.decode_frames(z, sessions=[old, new])
    assert [f.shape[0] for f in out] == [wan.frames_per_chunk, wan.first_chunk_frames]
    assert old.decoder_state is not None and new.decoder_state is not None


def test_wan_stream_needs_two_latent_frames_per_chunk(tmp_path):
    from tests.tiny_models import wan_stream

    with pytest.raises(CheckpointError, match="chunk_frames >= 2"):
        StreamPipeline(load_checkpoint(wan_stream(tmp_path / "w", chunk_frames=1)))


def test_session_state_estimate_matches_a_running_session(wan):
    """The admission estimate (buffer + causal-VAE cache, the cache measured on an 8x8 latent and scaled by area)
    equals what a real session holds once it has emitted two chunks."""
    from fewstep.engines.stream.scheduler import session_state_bytes

    core = EngineCore({"video": wan}, EngineConfig())
    s = core.open_stream(StreamStart(prompt="a red ball", seed=1, fps=0, format="raw"))
    for _ in range(wan.buffer_chunks + 3):
        core.stream_step()
    assert s.frames_generated >= 2 * wan.frames_per_chunk
    held = session_state_bytes(s)
    assert held > s.buffer.nbytes  # the cache is there
    assert wan.session_state_estimate(s.height, s.width) == held
    core.shutdown()
