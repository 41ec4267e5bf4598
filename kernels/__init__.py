"""fewstep kernels: Triton kernels with plain-torch references and diffusers integration.

Importing this package does not import triton (the server must run on CPU hosts without it); the
public names below load their module on first access. The kernel entry points live in their
modules (``from fewstep.kernels.block_sparse_attention import block_sparse_attention``): a package
attribute of the same name as a submodule would be clobbered by the submodule on import.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "mask_to_indices": ".block_sparse_attention",
    "TileConfig": ".block_sparse_attention",
    "build_block_mask": ".block_sparse_mask",
    "tile_3d_permutation": ".block_sparse_mask",
    "static_tile_mask": ".block_sparse_mask",
    "BlockSparseAttnProcessor": ".attention_processor",
    "BlockSparseConfig": ".attention_processor",
    "enable_block_sparse_attention": ".attention_processor",
    "disable_block_sparse_attention": ".attention_processor",
    "attention_ref": ".reference",
    "block_sparse_attention_ref": ".reference",
    "cfg_combine_ref": ".reference",
    "fused_cfg_step_ref": ".reference",
    "adapter_linear_ref": ".reference",
    "nasa_attention_ref": ".reference",
    "NasaAttnProcessor": ".nasa_processor",
    "NasaState": ".nasa_processor",
    "enable_nasa": ".nasa_processor",
    "disable_nasa": ".nasa_processor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
