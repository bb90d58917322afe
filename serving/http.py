"""The HTTP side of the ingress: the FastAPI app with its JSON errors and OpenAPI extras, and
request-body parsing. Nothing here holds a model or imports Ray.

Every user mistake is a 4xx JSON `{"error": "..."}`; nothing echoes the request body. A body is
read with a size cap and a deadline (a client sending a byte a second gets 408, not a held
connection), and JSON nested past the parser's recursion limit is a 400, not a RecursionError
(a 500).
"""

import asyncio
import base64
import binascii
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.schemas import ClassifyJSON, ClassifyParams, ErrorResponse


class ApiError(Exception):
    """A refused request: `status` is the HTTP code, `message` the one-line reason."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def short(text: str, n: int = 60) -> str:
    """A client-supplied name, cut short for an error message."""
    return text if len(text) <= n else text[:n] + "..."


def validation_message(e: ValidationError | RequestValidationError) -> str:
    parts = []
    for err in e.errors():
        # field names only (a client-chosen key is cut short); never err["input"]
        loc = ".".join(short(str(x), 40) for x in err.get("loc", ()) if x not in ("body", "query"))
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# the app: errors and OpenAPI documentation (the routes are the Ingress deployment's methods)

ERRORS = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in {
        400: "malformed body, base64 or image (not an image, truncated, corrupt), JSON nested "
        "too deeply",
        404: "unknown token set or label, or generation disabled",
        408: "the body did not arrive within the server's body_timeout_s",
        413: "body over max_body_bytes, or image over max_pixels",
        415: "unsupported Content-Type",
        422: "bad parameter",
        503: "over capacity (classification, or the generation queue): retry after the "
        "Retry-After header; /healthz: the classifier did not answer",
    }.items()
}

IMAGE_FIELD_DOC = "The image file: PNG, JPEG, WEBP, BMP or GIF."
CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {
                            "type": "string",
                            "format": "binary",
                            "description": IMAGE_FIELD_DOC,
                        },
                        **ClassifyParams.model_json_schema()["properties"],
                    },
                }
            },
            "application/json": {"schema": ClassifyJSON.model_json_schema()},
        },
    }
}

app = FastAPI(
    title="MC-TI classifier",
    description="Classify images with learned class tokens (multi-class textual inversion). "
    'Errors are JSON `{"error": "..."}` with a 4xx code; over capacity is a fast 503.',
    version="1",
)


@app.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return error_response(e.status, e.message, e.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    return error_response(e.status_code, str(e.detail), getattr(e, "headers", None))


@app.exception_handler(RequestValidationError)
async def _request_validation(_: Request, e: RequestValidationError) -> JSONResponse:
    return error_response(422, validation_message(e))


@app.exception_handler(Exception)
async def _internal(_: Request, e: Exception) -> JSONResponse:
    # A bug, not the client's fault: JSON like every other error; Serve logs the traceback.
    return error_response(500, "internal error")


# ---------------------------------------------------------------------------------------------
# request bodies


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, refusing more than `limit` bytes without reading them all (413), and a
    body that has not fully arrived `timeout_s` after the first read (408)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad Content-Length header")
        if int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit}")
    buf = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            buf.extend(chunk)
            if len(buf) > limit:
                raise ApiError(413, f"the request body is over the limit of {limit} bytes")

    try:
        await asyncio.wait_for(read(), timeout_s)
    except TimeoutError:
        raise ApiError(
            408, f"the request body did not arrive within {timeout_s:g} s", {"Connection": "close"}
        ) from None
    return bytes(buf)


def json_object(body: bytes, needs: str) -> dict:
    """The body as a JSON object: 400 when it is not JSON (nesting deeper than the parser's
    recursion limit included), 422 when it is not an object."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON") from None
    except RecursionError:  # e.g. "[" * 100_000: refused in about a millisecond
        raise ApiError(400, "the JSON body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(422, f"the JSON body must be an object with {needs}")
    return data


def params(model: type[BaseModel], data: dict) -> BaseModel:
    """A request model from client data: 422 naming the fields that are wrong."""
    try:
        return model(**data)
    except ValidationError as e:
        raise ApiError(422, validation_message(e)) from None


async def parse_classify(
    request: Request, limit: int, timeout_s: float
) -> tuple[ClassifyParams, bytes]:
    """multipart (`image` file + form fields) or JSON (`image_b64` + keys) -> params, image bytes."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, limit, timeout_s)
    if ctype == "multipart/form-data":

        async def replay() -> dict:  # the body is already read (and size-checked): parse it
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
        try:
            image = form.get("image")
            if not isinstance(image, UploadFile):
                raise ApiError(422, "image: a file field named 'image' is required")
            fields = {k: v for k, v in form.items() if k != "image"}
            if any(not isinstance(v, str) for v in fields.values()):
                raise ApiError(422, "only the 'image' field may be a file")
            return params(ClassifyParams, fields), await image.read()
        finally:
            await form.close()
    if ctype == "application/json" or ctype.endswith("+json"):
        req = params(ClassifyJSON, json_object(body, "image_b64"))
        b64 = req.image_b64
        if b64.startswith("data:"):
            b64 = b64.partition(",")[2]
        try:
            image = base64.b64decode("".join(b64.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image_b64 is not valid base64") from None
        return ClassifyParams(**req.model_dump(exclude={"image_b64"})), image
    raise ApiError(
        415,
        "send multipart/form-data with an 'image' file field, or application/json with image_b64",
    )
