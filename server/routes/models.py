from __future__ import annotations

from fastapi import APIRouter, Request

from ..protocol import ModelCard, ModelList, error_responses

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 403, 429, 503))
async def list_models(request: Request) -> ModelList:
    state = request.app.state.fewstep
    cards = []
    if state.core is not None:
        for name, pipe in state.core.pipelines.items():
            video = getattr(pipe, "kind", "image") == "video"
            cards.append(ModelCard(id=name, created=state.started, default_size=pipe.default_size,
                                   sizes=state.core.sizes[name].describe(),
                                   default_steps=pipe.default_steps, sampler=pipe.sampler,
                                   kind="video" if video else "image",
                                   chunk_frames=pipe.frames_per_chunk if video else None,
                                   fps=pipe.fps if video else None,
                                   prompt_completion=_completion(pipe)))
    return ModelList(data=cards)


def _completion(pipe) -> dict[str, str] | None:
    spec = getattr(pipe, "prompt_completion", None)
    return None if spec is None else {"unless": spec[0].pattern, "append": spec[1]}
