"""The two Serve deployments: an HTTP ingress in front of a batched classifier.

    proxy -> Ingress (read body with a size cap and deadline, validate, decode image)
             -- uint8 pixels --> MctiClassifier (base model once, every token set resident,
             @serve.batch + Batcher: one scorer call per (token set, scorer) group of a batch;
             generation in its own bounded queue, yielding the model to scoring between steps)

The ingress holds no model (no GPU); it refuses bad input before it reaches a GPU replica and
turns the classifier handle's back-pressure, and a full generation queue, into a fast 503. Every
token set stays resident in every classifier replica (a set costs K x L x d conditioning,
kilobytes to a few hundred MB), so any replica answers any request and one batch may mix sets
(README.md, "Serving", says why this beats multiplexing here).
"""

import asyncio
import io
import logging
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request
from fastapi.responses import Response
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool

from serving.batcher import Batcher, ModelTurns
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
from serving.schemas import (
    ClassifyResponse,
    GenerateRequest,
    HealthResponse,
    TokenSetsResponse,
)

log = logging.getLogger("ray.serve")  # Serve's logger: replica logs, never request payloads

HEALTH_TIMEOUT_S = 3.0  # /healthz: a classifier that does not answer within this is unhealthy
BUSY = {"Retry-After": "1"}


@serve.deployment
class MctiClassifier:
    """Base model once per replica, every token set resident, requests batched."""

    def __init__(self, cfg: dict):
        import torch

        from mcti.core.fused import load_fused
        from mcti.core.model import load_model
        from mcti.core.scoring import Classifier
        from mcti.core.store import load_tokens

        keep_replica_grpc_on_loopback()
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
            fused = load_fused(path, len(labels)) if "fused" in self.scorers else None
            scorers = Classifier.for_scorers(self.bundle, tokens, table, cfg, self.scorers, fused)
            self.sets[key] = dict(
                tokens=tokens, table=table, labels=labels, meta=meta, scorers=scorers
            )
        # Scoring and generation each have a thread; ModelTurns lets one compute at a time
        # (TokenSet.encode swaps the text encoder's embedding: nothing may race it), scoring
        # first. The event loop stays free to collect requests while the model computes.
        self.turns = ModelTurns()
        self.batcher = Batcher(
            self._score,
            cfg.max_batch_size,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcti-score"),
        )
        self.generate_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcti-generate")
        self.collect.set_max_batch_size(cfg.max_batch_size)
        self.collect.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
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

    def health(self) -> int:
        """Token sets served (answered from the event loop: a busy model does not make it late)."""
        return len(self.sets)

    def stats(self) -> dict:
        sizes = self.batcher.batch_sizes
        return {
            "batches": sum(sizes.values()),
            "requests": sum(n * c for n, c in sizes.items()),
            "batch_sizes": {str(n): c for n, c in sorted(sizes.items())},
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

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def collect(self, items: list[dict]) -> list[asyncio.Future]:
        return self.batcher.add(items)

    def _score(self, items: list[dict]) -> list[dict]:
        from serving.images import to_pixels

        with self.turns.scoring():
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
    ) -> bytes | None:
        """A PNG grid, or None at once when max_generate_queue generations are already here."""
        if self.ongoing["generate"] >= self.cfg.max_generate_queue:
            return None
        loop = asyncio.get_running_loop()
        self.ongoing["generate"] += 1
        try:
            return await loop.run_in_executor(
                self.generate_pool, self._generate, token_set, label, n, steps, guidance, seed
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
        with self.turns.generation():
            images = generate(
                self.bundle,
                s["tokens"],
                s["table"],
                k,
                n,
                self.cfg.template,
                steps,
                guidance,
                seed,
                progress=self.turns.steps,
            )
        buf = io.BytesIO()
        to_grid(images, upscale_to=128).save(buf, format="PNG")
        return buf.getvalue()


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

    async def info(self) -> dict:
        """The classifier's token sets and scorers (fixed for a deployment: asked once)."""
        if self._info is None:
            async with self._info_lock:
                if self._info is None:
                    self._info = await self._call("info")
        return self._info

    def _token_set(self, info: dict, key: str | None) -> str:
        key = key or self.cfg.default_token_set
        if key not in info["token_sets"]:
            raise ApiError(
                404, f"unknown token set '{short(key)}' (known: {', '.join(info['token_sets'])})"
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
        cfg = self.cfg
        req, image = await parse_classify(request, cfg.max_body_bytes, cfg.body_timeout_s)
        info = await self.info()
        key = self._token_set(info, req.token_set)
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

    @app.get("/healthz", response_model=HealthResponse, responses=ERRORS, summary="Health")
    async def healthz(self) -> dict:
        """Asks a classifier replica on every call: 200 when one answers within
        HEALTH_TIMEOUT_S ("busy" when its queue is full), else 503."""
        try:
            n = await asyncio.wait_for(self.classifier.health.remote(), HEALTH_TIMEOUT_S)
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
        return {"status": "ok", "token_sets": n}

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
        info = await self.info()
        key = self._token_set(info, req.token_set)
        if req.label not in info["token_sets"][key]["labels"]:
            raise ApiError(404, f"label '{short(req.label)}' is not in token set '{key}'")
        png = await self._call("generate", key, req.label, req.n, req.steps, req.guidance, req.seed)
        if png is None:
            raise ApiError(503, "the generation queue is full; retry shortly", BUSY)
        return Response(png, media_type="image/png")
