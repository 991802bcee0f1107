"""The one error path of `dhad serve`: every error, ours or the framework's, leaves in OpenAI's shape.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": "..."}}

- `APIError` is what route code raises; `install(app)` maps it and FastAPI's / Starlette's own errors
  (422 validation, 404 no route, 405 wrong method, 400 unparsable body, anything unexpected -> 500) to
  that shape, so the official client raises them with their message.
- Nothing the client sent is echoed beyond a bound: a field name or value quoted in a message is cut
  to `QUOTE_CHARS`, a whole message to `MESSAGE_CHARS` (FastAPI's default 422 body repeats the entire
  input: a 48 MB bad request answered with 96 MB). Text that cannot be encoded -- a lone surrogate
  from a JSON escape like ``"\\ud800"`` -- is written as its escape, never raised on.
"""
from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

MESSAGE_CHARS = 2000  # longest error message sent
QUOTE_CHARS = 80      # longest piece of the request quoted in a message (a field name, a value)


class APIError(Exception):
    """An error answer: raise it anywhere below a route and the client gets it in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def safe_text(value, limit: int = QUOTE_CHARS) -> str:
    """``value`` as text that always encodes (lone surrogates become ``\\udXXX``), cut to ``limit`` characters."""
    s = value if isinstance(value, str) else str(value)
    if len(s) > limit:
        s = s[:limit] + f"... ({len(s) - limit} more characters)"
    if not s.isascii():
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": safe_text(message, MESSAGE_CHARS), "type": type_,
                      "param": None if param is None else safe_text(param),
                      "code": None if code is None else safe_text(code)}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def _is_branch_label(x) -> bool:
    """pydantic names the member of a union it tried in ``loc`` ("list[TextPart]", "function-after[...]")."""
    return isinstance(x, str) and ("[" in x or x.startswith(("function-", "constrained-", "json-or-python")))


def _loc(err: dict) -> str:
    return ".".join(safe_text(x) for x in err.get("loc", ()) if x != "body" and not _is_branch_label(x))


_MESSAGES = {  # pydantic messages that do not say what to do
    "string_unicode": "must be valid Unicode text (a lone surrogate escape such as \\ud800 is not)",
    "finite_number": "must be a finite number (NaN and Infinity are not JSON numbers)",
}


def validation_message(errors: list[dict]) -> tuple[str, str | None, str | None]:
    """(message, param, code) for pydantic's errors: field paths and messages, never the input values."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":  # loc is ("body", character offset): not a field
        pos = next((x for x in first.get("loc", ()) if isinstance(x, int)), None)
        why = (first.get("ctx") or {}).get("error") or first.get("msg") or "JSON decode error"
        where = f" at character {pos}" if pos is not None else ""
        return f"the request body is not valid JSON{where}: {safe_text(why)}", None, "json_invalid"
    parts = list(dict.fromkeys(
        f"{_loc(e) or 'body'}: {_MESSAGES.get(e.get('type')) or safe_text(e.get('msg', 'invalid'), 200)}"
        for e in errors))
    more = f" (+{len(parts) - 5} more)" if len(parts) > 5 else ""
    return "; ".join(parts[:5]) + more, _loc(first) or None, first.get("type")


_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 413: "invalid_request_error", 429: "rate_limit_error"}


def install(app: FastAPI) -> None:
    """Route every error of ``app`` through OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        message, param, code = validation_message(list(e.errors()))
        return error_response(422, message, "invalid_request_error", param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        status = e.status_code
        if status == 404:
            message, code = f"no such endpoint: {request.method} {safe_text(request.url.path)}", "not_found"
        elif status == 405:
            allowed = (e.headers or {}).get("allow") or (e.headers or {}).get("Allow")
            message = f"{request.method} is not allowed on {safe_text(request.url.path)}" + \
                (f" (allowed: {allowed})" if allowed else "")
            code = "method_not_allowed"
        elif status == 400 and isinstance(e.__cause__, UnicodeDecodeError):  # FastAPI: body is not UTF-8
            u = e.__cause__
            message = f"the request body is not valid UTF-8 (byte 0x{u.object[u.start]:02x} at offset {u.start})"
            code = "invalid_utf8"
        elif status == 400 and isinstance(e.__cause__, RecursionError):
            message, code = "the request body is nested too deeply", "json_invalid"
        else:
            message = e.detail if isinstance(e.detail, str) else json.dumps(e.detail, default=str)
            code = None
        type_ = "server_error" if status >= 500 else _STATUS_TYPES.get(status, "invalid_request_error")
        return error_response(status, message, type_, None, code, e.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        # Starlette logs the traceback after this answer is sent; the client learns only the kind.
        return error_response(500, f"internal server error ({type(e).__name__})", "server_error")
