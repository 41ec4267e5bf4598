from __future__ import annotations

from fastapi import APIRouter, Request

from ..protocol import ModelCard, ModelList, error_responses

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 403, 429, 503))
async def list_models(request: Request) -> ModelList:
    state = request.app.state.fewstep
    cards = []
    if state.core is not None:
        for name, runner in state.core.pipelines.items():
            caps = runner.capabilities
            spec = caps.prompt_completion
            cards.append(ModelCard(id=name, created=state.started, default_size=caps.default_size,
                                   sizes=state.core.sizes[name].describe(), default_steps=caps.default_steps,
                                   default_guidance_scale=caps.default_guidance,
                                   sampler=caps.sampler, kind=caps.kind, chunk_frames=caps.frames_per_chunk,
                                   fps=caps.fps, guidance_modes=list(caps.guidance_modes),
                                   prompt_completion=None if spec is None else {"unless": spec[0].pattern,
                                                                                "append": spec[1]},
                                   example_prompts=list(caps.example_prompts)))
    return ModelList(data=cards)
