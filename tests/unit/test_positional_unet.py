"""fewstep.engines.models.PositionalUNet2DConditionModel: a plain UNet at initialisation, positions after."""

from __future__ import annotations

import torch

from fewstep.engines.models import PositionalUNet2DConditionModel
from fewstep.engines.models.positional_unet import _Positioned, pixel_sincos

CFG = dict(sample_size=16, block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 2), cross_attention_dim=8,
           norm_num_groups=8, position_features=8)


def test_table_is_in_image_pixels_whatever_the_grid():
    t16, t8 = pixel_sincos(8, 16, 16, 16), pixel_sincos(8, 8, 8, 16)
    assert t16.shape == (8, 16, 16) and t8.shape == (8, 8, 8)
    # rows in the first half of the channels (constant along a row), columns in the second
    assert torch.equal(t16[:4, 3, 0], t16[:4, 3, 9]) and not torch.equal(t16[:4, 3, 0], t16[:4, 5, 0])
    assert torch.equal(t16[4:, 0, 3], t16[4:, 9, 3]) and not torch.equal(t16[4:, 0, 3], t16[4:, 0, 5])
    # cell (0, 0) of the 8-grid is centred at pixel 1, like the corner between cells (0,0)..(1,1) of the 16-grid
    ref = pixel_sincos(8, 16, 16, 16)  # centres at 0.5, 1.5: pixel 1 is between them
    assert torch.allclose(t8[:, 0, 0], torch.cat([_at(1.0), _at(1.0)]), atol=1e-6)
    assert not torch.allclose(t8[:, 0, 0], ref[:, 0, 0])


def _at(p: float) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(2, dtype=torch.float32) / 2)
    return torch.cat([(p * omega).sin(), (p * omega).cos()])


def test_zero_init_is_the_plain_unet_and_a_nonzero_map_changes_it(tmp_path):
    torch.manual_seed(0)
    m = PositionalUNet2DConditionModel(**CFG).eval()
    n_blocks = sum(isinstance(mod, _Positioned) for mod in m.modules())
    assert n_blocks == 4  # 1 down + 1 mid + 2 up attention blocks
    x, t, e = torch.randn(2, 3, 16, 16), torch.tensor([500.0, 500.0]), torch.randn(2, 5, 8)
    plain = type(m.unet)(**{k: v for k, v in m.unet.config.items() if not k.startswith("_")}).eval()
    # the wrapped blocks hold the same modules: copy the UNet's weights into a plain one
    sd = {k.replace(".block.", "."): v for k, v in m.unet.state_dict().items()
          if ".proj.weight" not in k or ".block." in k}
    plain.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, e, return_dict=False)[0], plain(x, t, e, return_dict=False)[0])
        for name, p in m.named_parameters():
            if name.endswith(".proj.weight") and ".block." not in name:
                p.normal_(0, 1.0)
        # with a nonzero map the table reaches the output
        y = m(x, t, e, return_dict=False)[0]
        assert not torch.allclose(y, plain(x, t, e, return_dict=False)[0], atol=1e-3)
    # save / load through diffusers' format keeps the function
    m.save_pretrained(tmp_path / "unet")
    m2 = PositionalUNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    with torch.no_grad():
        torch.testing.assert_close(m2(x, t, e, return_dict=False)[0], y)
