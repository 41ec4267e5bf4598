"""The per-model `attention` engine option installs the block-sparse processor (or xformers') without forking model
code."""

import numpy as np
import pytest
import torch

from fewstep.engines.config import EngineConfig
from fewstep.engines.loading import load_checkpoint
from fewstep.engines.pipeline import FewStepPipeline
from fewstep.kernels.attention_processor import block_sparse_processors


def test_block_sparse_option_installs_and_falls_back_on_cpu(tiny_dir):
    dense = FewStepPipeline(load_checkpoint(tiny_dir / "pixart"))
    sparse = FewStepPipeline(load_checkpoint(tiny_dir / "pixart"), attention="block_sparse(threshold=0.9,block=16)")
    assert len(block_sparse_processors(sparse.denoiser)) == 2  # attn1 of both blocks; cross-attention untouched
    assert block_sparse_processors(dense.denoiser) == []
    a = dense(["a red circle"], [3], 32, 32, 2, 0.0).numpy()
    b = sparse(["a red circle"], [3], 32, 32, 2, 0.0).numpy()
    # fp32 on the CPU is outside the kernel's domain: the processor must fall back to exactly the dense path
    assert np.array_equal(a, b)


def test_bad_attention_option_is_explained():
    with pytest.raises(ValueError, match="dense.*block_sparse.*xformers"):
        EngineConfig(attention="sparse please")
    assert EngineConfig(attention=" XFormers").attention == "xformers"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusal")
def test_xformers_on_the_cpu_says_what_to_use(tiny_dir):
    with pytest.raises(ValueError, match="needs a CUDA device.*use 'dense'"):
        FewStepPipeline(load_checkpoint(tiny_dir / "sd_turbo"), attention="xformers")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers runs on CUDA")
@pytest.mark.parametrize("name,size", [("sd_turbo", 64), ("pixart", 32)])
def test_xformers_matches_sdpa_on_gpu(tiny_dir, name, size):
    """Where xformers is installed and runs, its self-attention gives the dense images (PSNR >= 35 dB); where it
    cannot run, the refusal names the reason (the test then checks that message and is skipped)."""
    from tests.unit.engines.test_parity import psnr

    dev = torch.device("cuda")
    dense = FewStepPipeline(load_checkpoint(tiny_dir / name, dev, torch.float16), dev, torch.float16)
    try:
        xf = FewStepPipeline(load_checkpoint(tiny_dir / name, dev, torch.float16), dev, torch.float16, "xformers")
    except ValueError as e:
        assert "xformers" in str(e) and "use 'dense'" in str(e)
        pytest.skip(f"xformers cannot run here: {e}")
    a = dense(["a red circle"], [3], size, size, 2, 0.0).cpu().numpy()
    b = xf(["a red circle"], [3], size, size, 2, 0.0).cpu().numpy()
    print(f"PSNR xformers {name}: {psnr(a, b):.1f} dB")
    assert psnr(a, b) >= 35


def test_static_and_table_options_are_checked(tmp_path, tiny_dir):
    opt = "block_sparse(mode=static,window=3x3x3,block=16,tile_3d=1x4x4)"
    assert EngineConfig(attention=opt).attention == opt
    with pytest.raises(ValueError, match="mode=static needs window"):
        EngineConfig(attention="block_sparse(mode=static,block=16,tile_3d=1x4x4)")
    with pytest.raises(ValueError, match="attention table .*cannot read it"):
        EngineConfig(attention=f"block_sparse(block=16,table={tmp_path / 'missing.json'})")
    table = tmp_path / "layers.json"
    table.write_text('{"layers": {"transformer_blocks.0.attn1": "static(1x3x3)", "blocks.7.attn1": "dense"}}')
    with pytest.raises(ValueError, match="unknown layer 'blocks.7.attn1'; valid: 0..1 or transformer_blocks.0.attn1, "
                                         "transformer_blocks.1.attn1"):
        FewStepPipeline(load_checkpoint(tiny_dir / "pixart"), attention=f"block_sparse(block=16,tile_3d=1x4x4,"
                                                                        f"table={table})")
    table.write_text('{"layers": {"transformer_blocks.0.attn1": "static(1x3x3)", "1": "dense"}}')
    sparse = FewStepPipeline(load_checkpoint(tiny_dir / "pixart"),
                             attention=f"block_sparse(block=16,tile_3d=1x4x4,table={table})")
    procs = block_sparse_processors(sparse.denoiser)
    assert len(procs) == 1 and procs[0].config.static and procs[0].config.window == (1, 3, 3)
