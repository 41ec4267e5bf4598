"""What a backend must provide to the engine: the ``Runner`` protocol and its ``Capabilities``.

Three implementations: eager (``FewStepPipeline``, and ``StreamPipeline`` for video models), compiled
(``backends/compiled.py``: torch.compile + CUDA graphs) and TensorRT (``backends/tensorrt.py``: engine stand-ins
inside an eager pipeline). ``backends/factory.py::make_runner`` picks one per model. The engine reads what a model
serves from ``capabilities`` and calls only the methods below, so a backend never needs to forward unknown
attributes or patch the pipeline it wraps.

Video runners (``kind == "video"``) additionally provide the stream stages the stream scheduler calls
(``denoise_step``, ``decode_frames``, ``noise_levels``, ...; see ``engines/stream/pipeline.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import re

    import torch

    from .pipeline import NasaInput, PromptEmbeds
    from .sizes import ServedSizes


@dataclass(frozen=True)
class Capabilities:
    """What a runner serves, fixed once it is built."""

    kind: Literal["image", "video"]
    backend: Literal["eager", "compiled", "tensorrt"]
    sizes: ServedSizes  # what admission accepts unless EngineConfig.sizes replaces it (engines/sizes.py)
    default_size: int  # native side in pixels
    default_steps: int
    default_guidance: float
    sampler: str  # the checkpoint's schedule kind: "euler", "consistency", "flow", ...
    max_images_per_batch: int | None = None  # None: any batch size runs (eager pads nothing; compiled falls back)
    prompt_completion: tuple[re.Pattern, str] | None = None  # checkpoint's fewstep.prompt_completion
    example_prompts: tuple[str, ...] = ()  # checkpoint's fewstep.example_prompts: prompts it is known to draw
    frames_per_chunk: int | None = None  # video: frames a client receives per emitted chunk (steady state)
    fps: float | None = None  # video: default frame rate
    img2img: bool = True  # whether ``denoise`` takes ``init`` images (image-to-image)
    # how the model takes guidance (FewStepPipeline.guidance_modes): "none", "cfg", "agd", "nasa"
    guidance_modes: tuple[str, ...] = ("none",)


@runtime_checkable
class Runner(Protocol):
    """One model on one backend. Stages: ``encode_prompt`` -> ``denoise`` -> ``decode``; everything on ``device``."""

    device: torch.device
    compile_seconds: float  # start-up time spent compiling, capturing or building engines (0 for eager)

    @property
    def capabilities(self) -> Capabilities: ...

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError for a size this runner cannot run at all (the architecture's multiple, an engine's
        profile). What the server chooses to serve is ``capabilities.sizes``, checked separately."""

    def batch_plan(self, n: int, height: int, width: int, steps: int) -> list[int]:
        """Rows per sub-batch for ``n`` waiting images of one shape; the engine runs the first now."""

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether this guidance scale runs a second (unconditional) branch."""

    def encode_prompt(self, prompts: list[str]) -> PromptEmbeds: ...

    def negative_embeds(self, negative_prompts: list[str]) -> PromptEmbeds: ...

    def denoise(self, cond: PromptEmbeds, generators: list[torch.Generator], height: int, width: int, steps: int,
                guidance_scale: float, uncond: PromptEmbeds | None = None, init: torch.Tensor | None = None,
                strength: float = 1.0, nasa: NasaInput | None = None) -> torch.Tensor:
        """Clean latents [B, C, h, w]; generators[i] drives image i (so batching never changes a result).
        ``init``: uint8 [B, H, W, 3] input images for image-to-image at ``strength`` (``capabilities.img2img``).
        ``nasa`` only where ``capabilities.guidance_modes`` lists "nasa"."""

    # image-to-image (runners whose capabilities say img2img): see FewStepPipeline.img2img_schedule
    def img2img_schedule(self, steps: int, strength: float): ...
    def img2img_steps(self, steps: int, strength: float) -> int: ...
    def img2img_default_steps(self, strength: float) -> int: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> uint8 images [B, H, W, 3] on ``device``."""
