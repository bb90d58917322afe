"""The Serve application: an HTTP ingress (FastAPI) in front of a batched classifier deployment.

    proxy -> Ingress (read body with a size cap, validate, decode image)  -- uint8 pixels -->
             Classifier (base model once, every token set resident, @serve.batch, one scorer
             call per (token set, scorer) group of a batch)

The ingress holds no model (no GPU); it refuses bad input before it reaches a GPU replica and
turns the classifier handle's back-pressure into a fast 503. Every token set stays resident in
every classifier replica (a set costs K x L x d conditioning, kilobytes to a few hundred MB), so
any replica answers any request and one batch may mix sets (README.md, "Serving", says why
this beats multiplexing here).

`build_app(args)` is the application builder (`import_path: serving.app:build_app`).
"""

import asyncio
import base64
import binascii
import io
import json
import logging
import time
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.config import AppConfig, load_config
from serving.schemas import (
    ClassifyJSON,
    ClassifyParams,
    ClassifyResponse,
    ErrorResponse,
    GenerateRequest,
    HealthResponse,
    TokenSetsResponse,
)

log = logging.getLogger("ray.serve")  # Serve's logger: replica logs, never request payloads

# ---------------------------------------------------------------------------------------------
# errors: every user mistake is a 4xx JSON {"error": "..."}; nothing echoes the request body


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _short(text: str, n: int = 60) -> str:
    """A client-supplied name, cut short for an error message."""
    return text if len(text) <= n else text[:n] + "..."


def _validation_message(e: ValidationError | RequestValidationError) -> str:
    parts = []
    for err in e.errors():
        # field names only (a client-chosen key is cut short); never err["input"]
        loc = ".".join(_short(str(x), 40) for x in err.get("loc", ()) if x not in ("body", "query"))
        loc = loc or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


ERRORS = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in {
        400: "malformed body, base64 or image (not an image, truncated, corrupt)",
        404: "unknown token set or label, or generation disabled",
        413: "body over max_body_bytes, or image over max_pixels",
        415: "unsupported Content-Type",
        422: "bad parameter",
        503: "over capacity: retry after the Retry-After header",
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
    return _error(e.status, e.message, e.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    return _error(e.status_code, str(e.detail), getattr(e, "headers", None))


@app.exception_handler(RequestValidationError)
async def _request_validation(_: Request, e: RequestValidationError) -> JSONResponse:
    return _error(422, _validation_message(e))


@app.exception_handler(Exception)
async def _internal(_: Request, e: Exception) -> JSONResponse:
    # A bug, not the client's fault: JSON like every other error; Serve logs the traceback.
    return _error(500, "internal error")


# ---------------------------------------------------------------------------------------------
# request parsing (ingress side)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing more than `limit` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad Content-Length header")
        if int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit}")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes")
    return bytes(buf)


def _json_object(body: bytes, needs: str) -> dict:
    """The body as a JSON object: 400 when it is not JSON, 422 when not an object."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(422, f"the JSON body must be an object with {needs}")
    return data


def _params(model: type, data: dict):
    try:
        return model(**data)
    except ValidationError as e:
        raise ApiError(422, _validation_message(e)) from None


async def parse_classify(request: Request, limit: int) -> tuple[ClassifyParams, bytes]:
    """multipart (`image` file + form fields) or JSON (`image_b64` + keys) -> params, image bytes."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, limit)
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
            params = _params(ClassifyParams, fields)
            return params, await image.read()
        finally:
            await form.close()
    if ctype == "application/json" or ctype.endswith("+json"):
        req = _params(ClassifyJSON, _json_object(body, "image_b64"))
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


# ---------------------------------------------------------------------------------------------
# deployments


@serve.deployment
class Classifier:
    """Base model once per replica, every token set resident, requests batched by @serve.batch."""

    def __init__(self, cfg: dict):
        import torch

        from mcti.core.model import load_model
        from mcti.core.scoring import Classifier
        from mcti.core.store import load_tokens

        self.cfg = cfg = AppConfig(**cfg)
        torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.num_cpus)))
        t0 = time.perf_counter()
        self.bundle = load_model(cfg.model, cfg.device, cfg.precision, cfg.attention, cfg.clip)
        if cfg.scorers is not None:
            self.scorers = list(cfg.scorers)
        else:
            extra = ["clip", "hybrid"] if self.bundle.clip is not None else []
            self.scorers = list(dict.fromkeys([cfg.scorer, *extra]))
        self.sets: dict[str, dict] = {}
        for key, path in cfg.tokens.items():
            tokens, table, labels, meta = load_tokens(path, self.bundle)
            # Conditioning (K, L, d) and CLIP text features are computed here, once per set.
            scorers = {
                s: Classifier.from_settings(self.bundle, tokens, table, cfg, s)
                for s in self.scorers
            }
            if "diffusion" in scorers and "hybrid" in scorers:  # same tokens, same template:
                scorers["hybrid"].diffusion.cond = scorers["diffusion"].diffusion.cond  # keep one
            self.sets[key] = dict(
                tokens=tokens, table=table, labels=labels, meta=meta, scorers=scorers
            )
        # One worker thread runs all model work: scorer calls never overlap (TokenSet.encode swaps
        # the text encoder's embedding, generation must not race it), and the event loop stays
        # free to collect requests while the model computes.
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcti-model")
        self.collect.set_max_batch_size(cfg.max_batch_size)
        self.collect.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.pending: deque[tuple[dict, asyncio.Future]] = deque()  # collected, not yet scored
        self.wake: asyncio.Event | None = None
        self.runner: asyncio.Task | None = None
        self.batch_sizes: Counter = Counter()  # images per scorer call
        self.ongoing: Counter = Counter()  # calls in this replica by method, for /v1/stats
        log.info(
            "mcti classifier ready in %.1fs: model %s on %s, token sets %s, scorers %s",
            time.perf_counter() - t0,
            cfg.model,
            self.bundle.device,
            {k: len(v["labels"]) for k, v in self.sets.items()},
            self.scorers,
        )

    def info(self) -> dict:
        return {
            "resolution": self.bundle.resolution,
            "scorers": self.scorers,
            "token_sets": {
                k: {
                    "labels": v["labels"],
                    "base_model": v["meta"]["base_model"]["spec"],
                    "method": v["meta"].get("method"),
                }
                for k, v in self.sets.items()
            },
        }

    def stats(self) -> dict:
        return {
            "batches": sum(self.batch_sizes.values()),
            "requests": sum(n * c for n, c in self.batch_sizes.items()),
            "batch_sizes": {str(n): c for n, c in sorted(self.batch_sizes.items())},
            "max_batch_size": self.cfg.max_batch_size,
            "ongoing": {k: n for k, n in self.ongoing.items() if n},
        }

    async def classify(self, item: dict) -> dict:
        """item: pixels (H, W, 3) uint8, token_set, scorer, top_k (validated by the ingress)."""
        item["arrived"] = time.perf_counter()
        self.ongoing["classify"] += 1
        try:
            return await (await self.collect(item))
        finally:
            self.ongoing["classify"] -= 1

    # Batching in two steps. @serve.batch collects concurrent requests (waiting up to
    # batch_wait_timeout_s for more once one arrives) and hands them to a single runner, which
    # scores everything collected so far, up to max_batch_size images, in one scorer call.
    # Requests that arrive while the model is busy therefore join the next call instead of
    # queueing as many small batches behind it, and with no wait a lone request starts at once:
    # batching costs nothing at concurrency 1 and fills batches under load. The collector
    # returns futures rather than results, so it never holds Serve's one batch slot while the
    # model runs.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def collect(self, items: list[dict]) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self.pending.extend(zip(items, futures, strict=True))
        if self.wake is None:
            self.wake = asyncio.Event()
        self.wake.set()
        if self.runner is None or self.runner.done():
            self.runner = loop.create_task(self._run())
        return futures

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            take = []
            while self.pending and len(take) < self.cfg.max_batch_size:
                item, fut = self.pending.popleft()
                if not fut.done():  # a cancelled request (client gone) is dropped here
                    take.append((item, fut))
            if not self.pending:
                self.wake.clear()
            if not take:
                continue
            self.batch_sizes[len(take)] += 1
            try:
                results = await loop.run_in_executor(self.pool, self._score, [i for i, _ in take])
            except Exception as e:  # a bug: fail these requests (500), keep serving the others
                log.exception("scoring a batch failed")
                results = [e] * len(take)
            for (_, fut), r in zip(take, results, strict=True):
                if fut.done():
                    continue
                if isinstance(r, Exception):
                    fut.set_exception(r)
                else:
                    fut.set_result(r)

    def _score(self, items: list[dict]) -> list[dict]:
        from serving.images import to_pixels

        start = time.perf_counter()
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            groups[(it["token_set"], it["scorer"])].append(i)
        out: list[dict] = [{} for _ in items]
        for (key, scorer), idx in groups.items():
            labels = self.sets[key]["labels"]
            t0 = time.perf_counter()
            s = self.sets[key]["scorers"][scorer].score(
                to_pixels([items[i]["pixels"] for i in idx])
            )
            ms = (time.perf_counter() - t0) * 1e3
            ranking = s.ranking()  # (B, K)
            for j, i in enumerate(idx):
                top = ranking[j, : min(items[i]["top_k"], len(labels))].tolist()
                vals = s.scores[j, top].tolist()
                out[i] = {
                    "labels": [labels[c] for c in top],
                    "scores": [v if v != float("-inf") else None for v in vals],
                    "batch_size": len(items),  # images in this batch, all groups
                    "queue_ms": (start - items[i]["arrived"]) * 1e3,
                    "score_ms": ms,
                }
        return out

    async def generate(
        self, token_set: str, label: str, n: int, steps: int, guidance: float, seed: int
    ) -> bytes:
        loop = asyncio.get_running_loop()
        self.ongoing["generate"] += 1
        try:
            return await loop.run_in_executor(
                self.pool, self._generate, token_set, label, n, steps, guidance, seed
            )
        finally:
            self.ongoing["generate"] -= 1

    def _generate(
        self, token_set: str, label: str, n: int, steps: int, guidance: float, seed: int
    ) -> bytes:
        from mcti.core.generate import generate, to_grid
        from mcti.core.store import label_index

        s = self.sets[token_set]
        k = label_index(s["labels"], label)
        images = generate(
            self.bundle, s["tokens"], s["table"], k, n, self.cfg.template, steps, guidance, seed
        )
        buf = io.BytesIO()
        to_grid(images, upscale_to=128).save(buf, format="PNG")
        return buf.getvalue()


@serve.deployment
@serve.ingress(app)
class Ingress:
    """HTTP side: parse, validate and decode; forward pixels to the classifier; map errors."""

    def __init__(self, classifier: DeploymentHandle, cfg: dict):
        self.classifier = classifier
        self.cfg = AppConfig(**cfg)
        self._info: dict | None = None
        self._info_lock = asyncio.Lock()

    async def _call(self, method: str, *args):
        """Call the classifier; its full queue (or no replica) is a fast 503, not a wait."""
        try:
            return await getattr(self.classifier, method).remote(*args)
        except BackPressureError:
            raise ApiError(
                503, "the server is at capacity; retry shortly", {"Retry-After": "1"}
            ) from None
        except DeploymentUnavailableError:
            raise ApiError(
                503, "no classifier replica is available yet", {"Retry-After": "5"}
            ) from None

    async def info(self) -> dict:
        if self._info is None:
            async with self._info_lock:
                if self._info is None:
                    self._info = await self._call("info")
        return self._info

    def _token_set(self, info: dict, key: str | None) -> str:
        key = key or self.cfg.default_token_set
        if key not in info["token_sets"]:
            raise ApiError(
                404, f"unknown token set '{_short(key)}' (known: {', '.join(info['token_sets'])})"
            )
        return key

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        responses=ERRORS,
        openapi_extra=CLASSIFY_BODY,
        summary="Best labels of one image",
    )
    async def classify(self, request: Request) -> dict:
        from serving.images import BadImage, decode_image

        t0 = time.perf_counter()
        params, image = await parse_classify(request, self.cfg.max_body_bytes)
        info = await self.info()
        key = self._token_set(info, params.token_set)
        scorer = params.scorer or self.cfg.scorer
        if scorer not in info["scorers"]:
            raise ApiError(
                422,
                f"scorer: '{_short(scorer)}' is not enabled here (enabled: {', '.join(info['scorers'])})",
            )
        t1 = time.perf_counter()
        try:  # decoding is CPU work: keep it off the event loop
            pixels = await run_in_threadpool(
                decode_image, image, info["resolution"], self.cfg.max_pixels
            )
        except BadImage as e:
            raise ApiError(e.status, e.message) from None
        t2 = time.perf_counter()
        item = {
            "pixels": pixels,
            "token_set": key,
            "scorer": scorer,
            "top_k": params.top_k or self.cfg.top_k,
        }
        r = await self._call("classify", item)
        t3 = time.perf_counter()
        return {
            "labels": r["labels"],
            "scores": r["scores"],
            "token_set": key,
            "scorer": scorer,
            "batch_size": r["batch_size"],
            "timings_ms": {
                "parse": (t1 - t0) * 1e3,
                "decode": (t2 - t1) * 1e3,
                "queue": r["queue_ms"],
                "score": r["score_ms"],
                "classifier": (t3 - t2) * 1e3,
                "total": (t3 - t0) * 1e3,
            },
        }

    @app.get("/v1/token-sets", response_model=TokenSetsResponse, summary="Hosted token sets")
    async def token_sets(self) -> dict:
        info = await self.info()
        return {
            "default": self.cfg.default_token_set,
            "scorers": info["scorers"],
            "default_scorer": self.cfg.scorer,
            "token_sets": [
                {
                    "id": k,
                    "default": k == self.cfg.default_token_set,
                    "n_classes": len(v["labels"]),
                    "labels": v["labels"],
                    "base_model": v["base_model"],
                    "method": v["method"],
                }
                for k, v in info["token_sets"].items()
            ],
        }

    @app.get("/healthz", response_model=HealthResponse, responses=ERRORS, summary="Liveness")
    async def healthz(self) -> dict:
        info = await self.info()  # answered by a classifier once, then cached
        return {"status": "ok", "token_sets": len(info["token_sets"])}

    @app.get("/v1/stats", summary="Batch sizes seen by the classifier replica that answers")
    async def stats(self) -> dict:
        return await self._call("stats")

    @app.post(
        "/v1/generate",
        responses={200: {"content": {"image/png": {}}, "description": "a PNG grid"}, **ERRORS},
        response_class=Response,
        summary="Draw images of one label (PNG)",
    )
    async def generate(self, request: Request) -> Response:
        if not self.cfg.enable_generate:
            raise ApiError(404, "generation is disabled on this server")
        body = await read_body(request, self.cfg.max_body_bytes)
        req = _params(GenerateRequest, _json_object(body, "a label"))
        if req.steps > self.cfg.max_generate_steps:
            raise ApiError(422, f"steps: at most {self.cfg.max_generate_steps} on this server")
        info = await self.info()
        key = self._token_set(info, req.token_set)
        if req.label not in info["token_sets"][key]["labels"]:
            raise ApiError(404, f"label '{_short(req.label)}' is not in token set '{key}'")
        png = await self._call("generate", key, req.label, req.n, req.steps, req.guidance, req.seed)
        return Response(png, media_type="image/png")


# ---------------------------------------------------------------------------------------------
# the application builder


def build_app(args: dict | AppConfig):
    """Serve application builder: `serve run serving.app:build_app tokens=DIR`, or the
    `import_path` of serving/serve_config.yaml. `args` are AppConfig keys."""
    cfg = load_config(args)
    opts: dict = dict(
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    )
    if cfg.min_replicas is not None:
        opts["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = cfg.num_replicas
    classifier = Classifier.options(**opts).bind(cfg.model_dump())
    # The ingress only awaits the classifier: let it hold far more requests than the classifiers
    # can, so back-pressure happens at the classifier handle (a JSON 503), never at the proxy.
    ingress_capacity = (
        4
        * (cfg.max_replicas or cfg.num_replicas)
        * (cfg.max_ongoing_requests + cfg.max_queued_requests)
    )
    return Ingress.options(
        num_replicas=cfg.ingress_replicas,
        max_ongoing_requests=max(100, ingress_capacity),
        ray_actor_options={"num_cpus": 0},
    ).bind(classifier, cfg.model_dump())
