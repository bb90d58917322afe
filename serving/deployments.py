"""The HTTP ingress deployment, in front of the batched classifier (serving/classifier.py).

    proxy -> Ingress (read body with a size cap and deadline, validate, decode image)
             -- uint8 pixels --> MctiClassifier (base model once, every token set resident,
             batched scoring, generation in its own bounded queue)

The ingress holds no model (no GPU); it refuses bad input before it reaches a GPU replica and
turns the classifier handle's back-pressure, and a full generation queue, into a fast 503. The
classifier's token sets can change while it runs (a Serve user_config update): the ingress
notices a new list from the answers and asks for it again.
"""

import asyncio
import time
from typing import Annotated

from fastapi import Query, Request
from fastapi.responses import Response
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool

from serving.config import AppConfig
from serving.http import (
    CLASSIFY_BODY,
    ERRORS,
    ApiError,
    app,
    json_object,
    params,
    parse_classify,
    read_body,
    short,
)
from serving.loopback import keep_replica_grpc_on_loopback
from serving.openset import open_set_fields
from serving.schemas import (
    ClassifyResponse,
    GenerateRequest,
    HealthResponse,
    TokenSetsResponse,
)

HEALTH_TIMEOUT_S = 3.0  # /healthz: a classifier that does not answer within this is unhealthy
INFO_REFRESH_S = 1.0  # an unknown token set asks the classifier again at most this often
LABELS_PAGE, MAX_LABELS_PAGE = 1000, 10_000  # /v1/token-sets: labels per set, default and most
BUSY = {"Retry-After": "1"}


@serve.deployment
@serve.ingress(app)
class Ingress:
    """HTTP side: parse, validate and decode; forward pixels to the classifier; map errors."""

    def __init__(self, classifier: DeploymentHandle, cfg: dict):
        keep_replica_grpc_on_loopback()
        self.classifier = classifier
        self.cfg = AppConfig(**cfg)
        self._info: dict | None = None
        self._info_lock = asyncio.Lock()
        self._info_time = 0.0

    async def _call(self, method: str, *args):
        """Call the classifier; its full queue (or no replica) is a fast 503, not a wait."""
        try:
            return await getattr(self.classifier, method).remote(*args)
        except BackPressureError:
            raise ApiError(503, "the server is at capacity; retry shortly", BUSY) from None
        except DeploymentUnavailableError:
            raise ApiError(
                503, "no classifier replica is available yet", {"Retry-After": "5"}
            ) from None

    async def info(self, stale: str | None = None) -> dict:
        """The classifier's token sets and scorers, asked again when they are not yet known or
        their version is `stale` (an answer named another list: the sets were swapped)."""
        if self._info is None or self._info["version"] == stale:
            async with self._info_lock:
                if self._info is None or self._info["version"] == stale:
                    self._info = await self._call("info")
                    self._info_time = time.monotonic()
        return self._info

    async def _token_set(self, info: dict, key: str | None) -> tuple[dict, str]:
        """(info, the token set id): an id not known here asks the classifier once more (it
        may be new), at most every INFO_REFRESH_S, before the 404."""
        key = key or info["default"]
        if key is None:
            raise ApiError(503, "no token set is loaded yet", {"Retry-After": "5"})
        if key not in info["token_sets"] and time.monotonic() - self._info_time > INFO_REFRESH_S:
            info = await self.info(stale=info["version"])
        if key not in info["token_sets"]:
            raise ApiError(
                404, f"unknown token set '{short(key)}' (known: {', '.join(info['token_sets'])})"
            )
        return info, key

    def _answered_by(self, info: dict, version: str) -> None:
        """The classifier answered with another list of sets: forget ours."""
        if version != info["version"] and self._info is info:
            self._info = None

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
        cfg = self.cfg
        req, image = await parse_classify(request, cfg.max_body_bytes, cfg.body_timeout_s)
        info, key = await self._token_set(await self.info(), req.token_set)
        scorer = req.scorer or cfg.scorer
        if scorer not in info["scorers"]:
            raise ApiError(
                422,
                f"scorer: '{short(scorer)}' is not enabled here (enabled: {', '.join(info['scorers'])})",
            )
        t1 = time.perf_counter()
        try:  # decoding is CPU work: keep it off the event loop
            pixels = await run_in_threadpool(
                decode_image, image, info["resolution"], cfg.max_pixels
            )
        except BadImage as e:
            raise ApiError(e.status, e.message) from None
        t2 = time.perf_counter()
        item = {
            "pixels": pixels,
            "token_set": key,
            "scorer": scorer,
            "top_k": req.top_k or cfg.top_k,
            "reject": req.reject or cfg.reject,
        }
        r = await self._call("classify", item)
        t3 = time.perf_counter()
        self._answered_by(info, r["sets_version"])
        if "missing" in r:
            raise ApiError(404, f"unknown token set '{short(key)}' (it was just removed)")
        return {
            "labels": r["labels"],
            "scores": r["scores"],
            "probs": r["probs"],
            "token_set": key,
            "scorer": scorer,
            **open_set_fields(r),
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
    async def token_sets(
        self,
        offset: Annotated[
            int, Query(ge=0, description="First label of each set to list (0: the first).")
        ] = 0,
        limit: Annotated[
            int,
            Query(ge=1, le=MAX_LABELS_PAGE, description="Labels listed per set, at most."),
        ] = LABELS_PAGE,
    ) -> dict:
        """Each set's labels a page at a time (`offset`, `limit`): a set of thousands of
        classes answers with one page and its `n_classes`, and `next_offset` asks for the
        next; a set that fits in the page lists them all."""
        info = await self.info()
        return {
            "default": info["default"],
            "scorers": info["scorers"],
            "default_scorer": self.cfg.scorer,
            "token_sets": [
                {
                    "id": k,
                    "default": k == info["default"],
                    "n_classes": len(v["labels"]),
                    "labels": v["labels"][offset : offset + limit],
                    "labels_offset": offset,
                    "next_offset": offset + limit if offset + limit < len(v["labels"]) else None,
                    "base_model": v["base_model"],
                    "method": v["method"],
                }
                for k, v in info["token_sets"].items()
            ],
        }

    @app.get(
        "/healthz",
        response_model=HealthResponse,
        response_model_exclude_none=True,
        responses=ERRORS,
        summary="Health",
    )
    async def healthz(self) -> dict:
        """Asks a classifier replica on every call: 200 when one answers within
        HEALTH_TIMEOUT_S ("busy" when its queue is full; "degraded", with the reason, when the
        last token sets it was given failed to load and the previous ones still serve), else
        503 (also when it serves no token set)."""
        try:
            h = await asyncio.wait_for(self.classifier.health.remote(), HEALTH_TIMEOUT_S)
        except BackPressureError:  # alive, shedding load
            return {"status": "busy", "token_sets": len((await self.info())["token_sets"])}
        except TimeoutError:
            raise ApiError(
                503, f"the classifier did not answer within {HEALTH_TIMEOUT_S:g} s", BUSY
            ) from None
        except Exception as e:  # no replica, or it died: say which kind, nothing more
            raise ApiError(
                503, f"the classifier is unavailable ({type(e).__name__})", BUSY
            ) from None
        if not h["token_sets"]:
            raise ApiError(503, f"no token set is loaded ({h['error'] or 'no user_config'})")
        if h["error"]:
            return {
                "status": "degraded",
                "token_sets": h["token_sets"],
                "token_sets_error": h["error"],
            }
        return {"status": "ok", "token_sets": h["token_sets"]}

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
        cfg = self.cfg
        if not cfg.enable_generate:
            raise ApiError(404, "generation is disabled on this server")
        body = await read_body(request, cfg.max_body_bytes, cfg.body_timeout_s)
        req = params(GenerateRequest, json_object(body, "a label"))
        if req.steps > cfg.max_generate_steps:
            raise ApiError(422, f"steps: at most {cfg.max_generate_steps} on this server")
        info, key = await self._token_set(await self.info(), req.token_set)
        if req.label not in info["token_sets"][key]["labels"]:
            raise ApiError(404, f"label '{short(req.label)}' is not in token set '{key}'")
        png = await self._call("generate", key, req.label, req.n, req.steps, req.guidance, req.seed)
        if png is None:
            raise ApiError(503, "the generation queue is full; retry shortly", BUSY)
        if isinstance(png, str):  # the sets were swapped since the ingress looked
            self._info = None
            raise ApiError(404, png)
        return Response(png, media_type="image/png")
