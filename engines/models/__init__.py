"""Model classes fewstep ships for its own checkpoints (diffusers ModelMixin/ConfigMixin subclasses).

A checkpoint names them in model_index.json as ["fewstep", "<ClassName>"]; the loader resolves the name here, so
our own models load through exactly the same path as diffusers' and transformers' classes. Add a class by
importing it below and listing it in __all__.
"""

from .positional_unet import PositionalUNet2DConditionModel
from .stream_dit import StreamDiTModel
from .stream_unet import StreamUNetModel

__all__: list[str] = ["PositionalUNet2DConditionModel", "StreamDiTModel", "StreamUNetModel"]
