"""StreamUNetModel: shapes, per-frame timesteps, frame attention (per cell / whole buffer), loading."""

import pytest
import torch

from fewstep.engines.models import PositionalUNet2DConditionModel, StreamUNetModel

CFG = dict(sample_size=16, block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D",) * 2,
           up_block_types=("CrossAttnUpBlock2D",) * 2, attention_head_dim=(1, 2), cross_attention_dim=12,
           norm_num_groups=8, position_features=8, max_frames=8, joint_tokens=64)


def _model(randomise=True, **kw):
    torch.manual_seed(0)
    m = StreamUNetModel(**{**CFG, **kw}).eval()
    if randomise:  # the output projection and the frame attentions start at zero: give them signal
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() > 1 and p.abs().max() == 0:
                    p.normal_(0, 0.1)
    return m


def _inputs(b=2, t=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, t, size, size, generator=g), torch.rand(b, t, generator=g) * 1000,
            torch.randn(b, 5, 12, generator=g), torch.ones(b, 5, dtype=torch.long))


@torch.no_grad()
def test_shapes_levels_and_output_type():
    m = _model()
    # 16 px level: 256 cells per frame -> attention per cell across frames; 8 px: 64 cells -> the whole buffer
    # down 16, down 8, mid 8, up 8 (x2), up 16 (x2)
    assert [fa.joint for fa in m.frame_attentions] == [False, True, True, True, True, False, False]
    x, ts, text, mask = _inputs()
    out = m(x, ts, text, mask)
    assert out.sample.shape == x.shape
    (tup,) = m(x, ts, text, mask, return_dict=False)
    assert torch.equal(tup, out.sample)
    assert m(torch.randn(1, 3, 2, 16, 16), torch.zeros(1), text[:1], None).sample.shape == (1, 3, 2, 16, 16)


@torch.no_grad()
def test_fresh_frame_attention_is_the_image_unet_per_frame():
    """Zero-initialised frame attention: the model computes the positional image UNet on every frame, each frame
    with its own timestep, so the video teacher starts where the image recipe starts."""
    m = _model(randomise=False)
    torch.manual_seed(1)
    for name, p in m.named_parameters():
        if ".frames." not in name:            # the spatial UNet with signal (its output starts at zero too)
            p.add_(torch.randn_like(p) * 0.05)
    img = PositionalUNet2DConditionModel(**{k: v for k, v in CFG.items() if k not in ("max_frames", "joint_tokens")})
    img.load_state_dict({k.replace(".spatial.", "."): v for k, v in m.unet.state_dict().items() if ".frames." not in k})
    x, ts, text, mask = _inputs(b=1, t=3)
    out = m(x, ts, text, mask).sample[0]
    assert out.abs().max() > 1e-2
    for t in range(3):
        ref = img(x[:, :, t], ts[:, t], text, encoder_attention_mask=mask).sample[0]
        assert torch.allclose(out[:, t], ref, atol=1e-5)


@torch.no_grad()
def test_per_frame_timesteps_and_frames_mix():
    m = _model()
    x, ts, text, mask = _inputs(b=1)
    base = m(x, ts, text, mask).sample
    ts2 = ts.clone()
    ts2[0, 2] = 1000 - ts2[0, 2]                     # one frame's noise level
    moved = (m(x, ts2, text, mask).sample - base).abs().amax(dim=(0, 1, 3, 4))
    assert moved[2] > 1e-3 and (moved[[0, 1, 3]] > 0).all()   # that frame most, the others through frame attention
    x2 = x.clone()
    x2[:, :, 0] += 1.0                                # another frame's content reaches frame 3
    assert (m(x2, ts, text, mask).sample[:, :, 3] - base[:, :, 3]).abs().max() > 1e-4


@torch.no_grad()
def test_text_mask_and_errors():
    m = _model()
    x, ts, text, mask = _inputs(b=1)
    masked = mask.clone()
    masked[:, 3:] = 0
    a = m(x, ts, text, masked).sample
    text2 = text.clone()
    text2[:, 3:] += 5.0                               # only masked positions change
    assert torch.allclose(a, m(x, ts, text2, masked).sample, atol=1e-5)
    assert not torch.allclose(a, m(x, ts, text2, mask).sample, atol=1e-3)
    with pytest.raises(ValueError, match="max_frames"):
        m(torch.randn(1, 3, 9, 16, 16), torch.zeros(1, 9), text, mask)
    with pytest.raises(ValueError, match="multiple of 2"):
        m(torch.randn(1, 3, 2, 15, 16), torch.zeros(1, 2), text, mask)
    with pytest.raises(ValueError, match=r"timestep must be \[B, T\]"):
        m(x, torch.zeros(1, 3), text, mask)


def test_save_and_load_roundtrip(tmp_path):
    m = _model()
    m.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    m2 = StreamUNetModel.from_pretrained(str(tmp_path / "transformer")).eval()
    x, ts, text, mask = _inputs()
    with torch.no_grad():
        assert torch.equal(m(x, ts, text, mask).sample, m2(x, ts, text, mask).sample)


@pytest.mark.parametrize("joint", [False, True])
@torch.no_grad()
def test_frame_attention_matches_a_per_token_loop(joint):
    """Both layouts against a loop over cells: per cell, attention over that cell's T frames; joint, one attention
    over all T*h*w cells of a buffer. Buffers never see each other."""
    from fewstep.engines.models.stream_unet import FrameAttention

    torch.manual_seed(0)
    fa = FrameAttention(8, 2, joint, max_frames=6).eval()
    for p in fa.parameters():
        p.normal_(0, 0.3)
    b, t, h, w = 2, 3, 2, 3
    x = torch.randn(b * t, 8, h, w)
    fa.frames = t
    got = fa(x)

    def tokens(bi):  # [T, h*w, C] of buffer bi, normalised, plus the frame-slot map
        v = x.view(b, t, 8, h * w)[bi].permute(0, 2, 1)
        return fa.norm(v) + fa.slot(fa.table[:t])[:, None, :]

    want = x.view(b, t, 8, h * w).clone()
    for bi in range(b):
        tok = tokens(bi)
        if joint:
            out = fa.attn(tok.reshape(1, t * h * w, 8)).view(t, h * w, 8)
        else:
            out = torch.stack([fa.attn(tok[:, c][None])[0] for c in range(h * w)], dim=1)   # [T, hw, C]
        want[bi] += out.permute(0, 2, 1)
    assert torch.allclose(got, want.view(b * t, 8, h, w), atol=1e-5)


@torch.no_grad()
def test_batch_rows_are_independent_streams():
    """Two buffers with different noise levels, texts and masks in one call equal two separate calls: the text,
    mask and timesteps are laid out per (buffer, frame) in the order the frames are."""
    m = _model()
    x, ts, text, mask = _inputs(b=2, t=4)
    mask[1, 2:] = 0
    both = m(x, ts, text, mask).sample
    for i in range(2):
        one = m(x[i:i + 1], ts[i:i + 1], text[i:i + 1], mask[i:i + 1]).sample
        assert torch.allclose(both[i:i + 1], one, atol=1e-5)
    # and the rows really differ in what they were given: swapping row 1's text changes only row 1
    text2 = text.clone()
    text2[1] = text[0]
    swapped = m(x, ts, text2, mask).sample
    assert torch.allclose(swapped[0], both[0], atol=1e-6) and not torch.allclose(swapped[1], both[1], atol=1e-3)
