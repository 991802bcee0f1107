"""The ALLaM card's endpoint: ``POST /score`` with
``{"input_data": {"input_string": [...], "parameters": {...}}}`` -> ``{"output": "..."}``;
transformers' parameter names and defaults, overlaid with the checkpoint's generation_config.json."""
from __future__ import annotations

from fastapi import APIRouter, Request

from dhad.serve import schemas as S
from dhad.serve.errors import APIError
from dhad.serve.service import Run, Service


def router(svc: Service, auth: list, errors) -> APIRouter:
    r = APIRouter(dependencies=auth)
    backend = svc.backend

    @r.post("/score", response_model=S.ScoreResponse, responses=errors(400, 401, 404, 408, 413, 422, 429, 503))
    async def score(req: S.ScoreRequest, request: Request):
        """The ALLaM card's endpoint: transformers' generation parameters, answer as ``output``. An
        optional top-level ``model`` (as in the OpenAI API) picks a LoRA adapter; default: the base model."""
        adapter = svc.check_model(req.model)
        messages = [m.model_dump() for m in req.input_data.input_string]
        given = req.input_data.parameters.model_dump(exclude_none=True)
        if "stop" in given:
            stop = given.pop("stop")
            given["stop_strings"] = (stop,) if isinstance(stop, str) else tuple(stop)
        if "stop_token_ids" in given:
            given["stop_token_ids"] = tuple(given["stop_token_ids"])
        if given.get("do_sample") and given.get("temperature") == 0:
            raise APIError(400, "temperature must be > 0 when do_sample is true (for greedy decoding set "
                                "do_sample=false)", param="temperature")
        if "max_length" in given and "max_new_tokens" not in given:
            given["max_new_tokens"] = None  # transformers: max_length alone bounds the total length
        elif "max_new_tokens" not in given and \
                (backend.defaults.max_new_tokens or 0) > backend.max_new_tokens_limit:
            given["max_new_tokens"] = backend.max_new_tokens_limit  # the default must respect the limit
        params = svc.params(backend.defaults, given, chat=True)
        run = Run(svc.submit(await svc.chat_ids(messages), params, adapter), svc.content_filter)
        return S.ScoreResponse(output=await run.collect(request))

    return r
