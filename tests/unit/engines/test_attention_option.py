"""The per-model `attention` engine option installs the block-sparse processor without forking model code."""

import numpy as np
import pytest

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
    with pytest.raises(ValueError, match="dense.*block_sparse"):
        EngineConfig(attention="sparse please")
