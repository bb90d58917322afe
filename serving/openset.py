"""Open set in the server: a request's `reject` (off, auto or a threshold; default: the config's
`reject`) turns its best label into "unknown" when the image's rejection score is below the
threshold (mcti/core/openset.py, mcti/eval/openset.py); the known labels and scores stay listed.
The classifier replica holds one `OpenSetRejection`; the ingress adds `open_set_fields`."""

from collections import Counter

from mcti.errors import UserError

# The ingress imports this module too, and holds no model: torch and the scores load lazily.


class OpenSetRejection:
    """Per replica: each token set's open-set state (loaded, or fit from its training shots,
    on first use; at start-up when the config's `reject` is on, so a bad set fails early) and
    the counts that /v1/stats reports."""

    def __init__(self, bundle, cfg):
        self.bundle, self.cfg = bundle, cfg
        self.states: dict = {}  # (token dir, its version) -> mcti.core.openset.OpenSet
        self.counts: Counter = Counter()

    def prepare(self, sets: dict[str, dict]) -> None:
        """Fit (or load) every set's state now, when the config's `reject` is on, so a set that
        cannot be fit fails while it is loaded (a live swap then keeps the old sets)."""
        if self.cfg.reject != "off":
            for entry in sets.values():
                self.state(entry)

    def state(self, entry: dict):
        """The mcti.core.openset.OpenSet of a served token set (serving.tokensets entry:
        labels, meta, path, version); a set rewritten in place gets a new version, so a new fit."""
        from mcti.eval.openset import open_set_state

        key = (entry["path"], entry["version"])
        if key not in self.states:
            self.states[key] = open_set_state(
                self.bundle, entry["labels"], entry["meta"], entry["path"]
            )
        return self.states[key]

    def apply(self, entry: dict, pixels, scores, items: list[dict], outs: list[dict]) -> None:
        """Add `label` and `rejection_score` to the answers `outs` of `items` (one token set's
        group of a batch, pixels (B, 3, H, W), their Scores) that ask for rejection."""
        from mcti.core.openset import DEFAULT_SCORE, UNKNOWN
        from mcti.eval.openset import Rejector

        wanted = [it.get("reject", "off") != "off" for it in items]
        if not any(wanted):
            return
        try:
            state = self.state(entry)
        except UserError as e:
            for out, w in zip(outs, wanted, strict=True):
                if w:
                    out["open_set_error"] = str(e)
            return
        values = Rejector(DEFAULT_SCORE, 0.0, state, "").scores(self.bundle, pixels, scores)
        for it, out, w, v in zip(items, outs, wanted, values.tolist(), strict=True):
            if not w:
                continue
            if it["reject"] == "auto":
                try:  # a one-shot set has a state (for a number) but no auto threshold
                    threshold = state.threshold(DEFAULT_SCORE, self.cfg.known_recall)
                except UserError as e:
                    out["open_set_error"] = str(e)
                    continue
            else:
                threshold = float(it["reject"])
            out["label"] = out["labels"][0] if v >= threshold else UNKNOWN
            out["rejection_score"] = v
            self.counts["checked"] += 1
            self.counts["rejected"] += out["label"] == UNKNOWN

    def stats(self) -> dict:
        return {
            "open_set": {"checked": self.counts["checked"], "rejected": self.counts["rejected"]}
        }


def open_set_fields(answer: dict) -> dict:
    """The response fields of a classifier answer's open-set part (none when it was off)."""
    from serving.http import ApiError

    if "open_set_error" in answer:
        raise ApiError(422, f"reject: {answer['open_set_error']}")
    if "label" not in answer:
        return {}
    return {"label": answer["label"], "rejection_score": answer["rejection_score"]}
