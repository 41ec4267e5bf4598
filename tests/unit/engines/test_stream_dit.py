"""StreamDiTModel: shapes, per-frame timesteps, text conditioning, loading, kernel compatibility."""

import pytest
import torch

from fewstep.engines.models import StreamDiTModel


def _model(**kw):
    torch.manual_seed(0)
    cfg = dict(sample_size=16, patch_size=4, in_channels=3, num_layers=2, num_attention_heads=2,
               attention_head_dim=8, caption_channels=12, max_frames=8)
    cfg.update(kw)
    m = StreamDiTModel(**cfg).eval()
    with torch.no_grad():  # DiT init zeroes the output: randomise it so the outputs carry signal
        for p in (m.time_mod[1].weight, m.proj_out.weight):
            p.normal_(0, 0.1)
    return m


def _inputs(b=2, t=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, t, size, size, generator=g)
    ts = torch.rand(b, t, generator=g) * 1000
    text = torch.randn(b, 5, 12, generator=g)
    mask = torch.ones(b, 5)
    return x, ts, text, mask


@torch.no_grad()
def test_shapes_and_output_type():
    m = _model()
    x, ts, text, mask = _inputs()
    out = m(x, ts, text, mask)
    assert out.sample.shape == x.shape
    (tup,) = m(x, ts, text, mask, return_dict=False)
    assert torch.equal(tup, out.sample)
    # other sizes (multiples of the patch) and fewer frames work with the same weights
    assert m(torch.randn(1, 3, 2, 24, 32), torch.zeros(1, 2), text[:1], None).sample.shape == (1, 3, 2, 24, 32)


@torch.no_grad()
def test_out_channels_and_zero_init():
    m = StreamDiTModel(sample_size=16, patch_size=4, in_channels=4, out_channels=8, num_layers=1,
                       num_attention_heads=2, attention_head_dim=8, caption_channels=12)
    x, ts, text, mask = _inputs()
    out = m(torch.randn(2, 4, 4, 16, 16), ts, text, mask).sample
    assert out.shape == (2, 8, 4, 16, 16)
    assert out.abs().max() == 0  # DiT init: a fresh model predicts v = 0


@torch.no_grad()
def test_per_frame_timesteps_matter():
    m = _model()
    x, ts, text, mask = _inputs(b=1)
    base = m(x, ts, text, mask).sample
    ts2 = ts.clone()
    ts2[0, 2] = 1000 - ts2[0, 2]  # change one frame's noise level only
    moved = m(x, ts2, text, mask).sample
    per_frame = (moved - base).abs().amax(dim=(0, 1, 3, 4))  # [T]
    assert per_frame[2] > 1e-3
    # the frame whose level changed moves most: its own adaLN modulation changed, the others only see it through
    # attention
    assert per_frame[2] == per_frame.max()
    # [B] timesteps broadcast to every frame and equal a constant [B, T]
    one = m(x, torch.full((1,), 500.0), text, mask).sample
    assert torch.allclose(one, m(x, torch.full((1, 4), 500.0), text, mask).sample)


@torch.no_grad()
def test_text_and_mask_condition_the_output():
    m = _model()
    x, ts, text, mask = _inputs(b=1)
    base = m(x, ts, text, mask).sample
    assert (m(x, ts, text + 1, mask).sample - base).abs().max() > 1e-3
    half = mask.clone()
    half[:, 3:] = 0
    assert (m(x, ts, text, half).sample - base).abs().max() > 1e-4


@torch.no_grad()
def test_frames_attend_to_each_other_and_batches_do_not_mix():
    m = _model()
    x, ts, text, mask = _inputs(b=2)
    base = m(x, ts, text, mask).sample
    x2 = x.clone()
    x2[0, :, 0] += 1.0  # perturb frame 0 of sample 0
    out = m(x2, ts, text, mask).sample
    assert (out[0, :, 3] - base[0, :, 3]).abs().max() > 1e-5  # self-attention spans the whole buffer
    assert torch.allclose(out[1], base[1], atol=1e-5)  # sample 1 is untouched


def test_checks_and_gradient_checkpointing():
    m = _model()
    x, ts, text, mask = _inputs(t=4)
    with pytest.raises(ValueError, match="max_frames"):
        m(torch.randn(1, 3, 9, 16, 16), torch.zeros(1, 9), text[:1], None)
    with pytest.raises(ValueError, match="patch_size"):
        m(torch.randn(1, 3, 2, 18, 16), torch.zeros(1, 2), text[:1], None)
    with pytest.raises(ValueError, match="timestep"):
        m(x, torch.zeros(2, 3), text, mask)
    m.train()
    m.enable_gradient_checkpointing()
    loss = m(x, ts, text, mask).sample.square().mean()
    loss.backward()
    assert m.proj_out.weight.grad is not None and m.transformer_blocks[0].attn1.to_q.weight.grad is not None


def test_block_sparse_processor_installs_on_self_attention():
    from fewstep.kernels.attention_processor import disable_block_sparse_attention, enable_block_sparse_attention

    m = _model(num_layers=3)
    assert enable_block_sparse_attention(m, "block_sparse(threshold=0.9,block=16)") == 3  # attn1 of each block
    x, ts, text, mask = _inputs(b=1)
    with torch.no_grad():
        out = m(x, ts, text, mask).sample  # CPU / fp32: the processor falls back to dense SDPA
    assert disable_block_sparse_attention(m) == 3
    with torch.no_grad():
        assert torch.allclose(out, m(x, ts, text, mask).sample, atol=1e-6)


def test_loads_from_a_checkpoint_directory(tiny_dir):
    from fewstep.engines.loading import load_checkpoint

    ckpt = load_checkpoint(tiny_dir / "stream_dit")
    model = ckpt.components["transformer"]
    assert isinstance(model, StreamDiTModel)
    assert ckpt.meta["kind"] == "video" and ckpt.scheduler_class == "FlowMatchEulerDiscreteScheduler"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
