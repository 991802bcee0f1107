"""The OpenAI API: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (``stream: true`` = server-sent events ending ``data: [DONE]``)."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from dhad.serve import schemas as S
from dhad.serve.service import SSE_DONE, Run, Service, sse

STARTED = int(time.time())
_SSE = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events when stream=true"}}


def router(svc: Service, auth: list, errors) -> APIRouter:
    r = APIRouter(dependencies=auth)
    backend = svc.backend

    def card(name: str) -> S.ModelCard:
        """A model id's card; a LoRA adapter names the base model as its ``parent`` (as vLLM does)."""
        parent = None if name == backend.model_name else backend.model_name
        return S.ModelCard(id=name, created=STARTED, max_model_len=backend.context, parent=parent)

    @r.get("/v1/models", response_model=S.ModelList, responses=errors(401))
    async def models():
        """The base model, then each LoRA adapter."""
        return S.ModelList(data=[card(n) for n in backend.model_names])

    @r.get("/v1/models/{model:path}", response_model=S.ModelCard, responses=errors(401, 404))
    async def model(model: str):
        """A served model's card (``client.models.retrieve(id)``); 404 for any other id."""
        svc.check_model(model)
        return card(model)

    @r.post("/v1/chat/completions", response_model=S.ChatCompletion,
            responses={**errors(400, 401, 404, 408, 413, 422, 429, 503), **_SSE})
    async def chat_completions(req: S.ChatCompletionRequest, request: Request):
        adapter = svc.check_model(req.model)
        name = adapter or backend.model_name
        base, given = svc.openai_params(req, default_max=backend.context)
        params = svc.params(base, given, chat=True)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        run = Run(svc.submit(await svc.chat_ids(messages), params, adapter), svc.content_filter)
        cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        if not req.stream:
            text = await run.collect(request)
            return S.ChatCompletion(id=cid, created=created, model=name, usage=run.usage, choices=[
                S.ChatChoice(index=0, message=S.AssistantMessage(content=text), finish_reason=run.finish_reason)])
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict, finish=None) -> bytes:
            return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            async for delta in run.deltas():
                yield chunk({"content": delta})
            yield run.error_event() if run.error else chunk({}, run.finish_reason)
            if include_usage:
                yield sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                           "model": name, "choices": [], "usage": run.usage.model_dump()})
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @r.post("/v1/completions", response_model=S.Completion,
            responses={**errors(400, 401, 404, 408, 413, 422, 429, 503), **_SSE})
    async def completions(req: S.CompletionRequest, request: Request):
        adapter = svc.check_model(req.model)
        name = adapter or backend.model_name
        base, given = svc.openai_params(req, default_max=16)  # OpenAI's default max_tokens for completions
        params = svc.params(base, given, chat=False)
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        run = Run(svc.submit(await svc.text_ids(prompt), params, adapter), svc.content_filter)
        cid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
        prefix = prompt if req.echo else ""
        if not req.stream:
            text = await run.collect(request)
            return S.Completion(id=cid, created=created, model=name, usage=run.usage, choices=[
                S.CompletionChoice(index=0, text=prefix + text, finish_reason=run.finish_reason)])
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(text: str, finish=None) -> bytes:
            return sse({"id": cid, "object": "text_completion", "created": created, "model": name,
                        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]})

        async def events():
            if prefix:
                yield chunk(prefix)
            async for delta in run.deltas():
                yield chunk(delta)
            yield run.error_event() if run.error else chunk("", run.finish_reason)
            if include_usage:
                yield sse({"id": cid, "object": "text_completion", "created": created, "model": name,
                           "choices": [], "usage": run.usage.model_dump()})
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return r
