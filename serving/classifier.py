"""The classifier deployment: the base model once per replica, every token set resident,
requests batched (@serve.batch + Batcher: one scorer call per (token set, scorer) group of a
batch), generation in its own bounded queue yielding the model to scoring between steps.

Every token set stays resident in every replica (a set costs K x L x d conditioning, kilobytes to
a few hundred MB), so any replica answers any request and one batch may mix sets (README.md,
"Serving", says why this beats multiplexing here). The sets are the deployment's Serve
user_config (serving/tokensets.py): `reconfigure` applies a new list on the running replica, the
model staying loaded, and swaps it in between batches. The HTTP side is serving/deployments.py.
"""

import asyncio
import io
import logging
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from serving.batcher import Batcher, ModelTurns
from serving.config import AppConfig
from serving.loopback import keep_replica_grpc_on_loopback
from serving.openset import OpenSetRejection
from serving.tokensets import TokenSets, load_sets, requested_version

log = logging.getLogger("ray.serve")  # Serve's logger: replica logs, never request payloads


@serve.deployment
class MctiClassifier:
    """Base model once per replica, every token set resident, requests batched."""

    def __init__(self, cfg: dict):
        import torch

        from mcti.core.model import load_model

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
        # Filled by reconfigure(user_config), which Serve calls before the first request.
        self.served = TokenSets()
        self.token_sets_error: str | None = None  # why the last user_config was not applied
        self.requested = ""  # the version of the last user_config, applied or not
        self.reload_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcti-reload")
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
        self.open_set = OpenSetRejection(self.bundle, cfg)  # `reject`: unknown instead of a label
        log.info(
            "mcti classifier ready in %.1fs: model %s on %s, scorers %s",
            time.perf_counter() - t0,
            cfg.model,
            self.bundle.device,
            self.scorers,
        )

    async def reconfigure(self, user_config: dict) -> None:
        """Apply a new list of token sets (Serve calls this at start and on every user_config
        change). Loading runs off the event loop, so requests keep being answered with the old
        sets until the one-reference swap; a failure keeps them and is reported in /healthz."""
        from mcti.errors import UserError

        t0 = time.perf_counter()
        requested = requested_version(user_config)
        loop = asyncio.get_running_loop()
        args = (user_config, self.served, self.bundle, self.cfg, self.scorers, self.turns.scoring)
        try:
            new = await loop.run_in_executor(self.reload_pool, load_sets, *args)
            await loop.run_in_executor(self.reload_pool, self.open_set.prepare, new.sets)
        except UserError as e:
            if not self.served.sets:  # at start: the replica fails, and says why
                raise
            self.token_sets_error, self.requested = str(e)[:500], requested
            log.error("token sets not applied; the previous sets keep serving: %s", e)
            return
        reused = sum(s is self.served.sets.get(k) for k, s in new.sets.items())
        # the swap: a batch reads self.served once, so it sees the old list or the new one
        self.served, self.token_sets_error, self.requested = new, None, requested
        log.info(
            "token sets %s applied in %.2fs (%d reused): %s",
            new.version,
            time.perf_counter() - t0,
            reused,
            {k: len(v["labels"]) for k, v in new.sets.items()},
        )

    def info(self) -> dict:
        served = self.served
        return {
            "resolution": self.bundle.resolution,
            "scorers": self.scorers,
            "default": served.default,
            "version": served.version,
            "token_sets": {
                k: {
                    "labels": v["labels"],
                    "base_model": v["meta"]["base_model"]["spec"],
                    "method": v["meta"].get("method"),
                }
                for k, v in served.sets.items()
            },
        }

    def health(self) -> dict:
        """Answered from the event loop: a busy model does not make it late."""
        return {
            "token_sets": len(self.served.sets),
            "version": self.served.version,
            "requested": self.requested,
            "error": self.token_sets_error,
            "pid": os.getpid(),
        }

    def stats(self) -> dict:
        sizes = self.batcher.batch_sizes
        return {
            "batches": sum(sizes.values()),
            "requests": sum(n * c for n, c in sizes.items()),
            "batch_sizes": {str(n): c for n, c in sorted(sizes.items())},
            "max_batch_size": self.cfg.max_batch_size,
            "ongoing": {k: n for k, n in self.ongoing.items() if n},
            "pid": os.getpid(),  # the replica process: unchanged by a token-set swap
            "token_sets_version": self.served.version,
            **self.open_set.stats(),
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

        served = self.served  # the whole batch is scored with one list of sets
        with self.turns.scoring():
            start = time.perf_counter()
            groups: dict[tuple[str, str], list[int]] = defaultdict(list)
            for i, it in enumerate(items):
                groups[(it["token_set"], it["scorer"])].append(i)
            out: list[dict] = [{} for _ in items]
            for (key, scorer), idx in groups.items():
                if key not in served.sets:  # removed since the ingress looked
                    for i in idx:
                        out[i] = {"missing": key, "sets_version": served.version}
                    continue
                labels = served.sets[key]["labels"]
                t0 = time.perf_counter()
                x = to_pixels([items[i]["pixels"] for i in idx])
                s = served.sets[key]["scorers"][scorer].score(x)
                ms = (time.perf_counter() - t0) * 1e3
                ranking = s.ranking()  # (B, K)
                for j, i in enumerate(idx):
                    top = ranking[j, : min(items[i]["top_k"], len(labels))].tolist()
                    vals = s.scores[j, top].tolist()
                    out[i] = {
                        "labels": [labels[c] for c in top],
                        "scores": [v if v != float("-inf") else None for v in vals],
                        # calibrated probabilities of the same labels (scorers that have them)
                        "probs": None if s.probs is None else s.probs[j, top].tolist(),
                        "batch_size": len(items),  # images in this batch, all groups
                        "queue_ms": (start - items[i]["arrived"]) * 1e3,
                        "score_ms": ms,
                        "sets_version": served.version,
                    }
                group = [items[i] for i in idx], [out[i] for i in idx]
                self.open_set.apply(served.sets[key], x, s, *group)
        return out

    async def generate(
        self, token_set: str, label: str, n: int, steps: int, guidance: float, seed: int
    ) -> bytes | str | None:
        """A PNG grid; None at once when max_generate_queue generations are already here;
        a message when the token set or label is no longer served."""
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
    ) -> bytes | str:
        from mcti.core.generate import generate, to_grid

        s = self.served.sets.get(token_set)
        if s is None:
            return f"token set '{token_set}' is no longer served"
        if label not in s["labels"]:
            return f"label '{label}' is no longer in token set '{token_set}'"
        k = s["labels"].index(label)
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
