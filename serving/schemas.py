"""Request and response bodies of the HTTP API (pydantic; they make the OpenAPI page at /docs)."""

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mcti.settings import SCORERS, Scorer, reject_problem


class ClassifyParams(BaseModel):
    """Options of POST /v1/classify (form fields beside `image`, or JSON keys beside `image_b64`)."""

    model_config = ConfigDict(extra="forbid")

    top_k: int | None = Field(
        None, ge=1, le=10_000, description="Labels returned (default: server's top_k)."
    )
    scorer: Scorer | None = Field(
        None, description=f"One of {', '.join(SCORERS)} that the server enables."
    )
    token_set: str | None = Field(
        None, description="Token set id (GET /v1/token-sets); default: the first."
    )
    reject: str | float | None = Field(
        None,
        description="Open set: off, auto or a threshold of the rejection score; below it the "
        "label is 'unknown' (default: the server's reject).",
    )

    @field_validator("reject")
    @classmethod
    def _reject(cls, v: str | float | None) -> str | None:
        if v is None:
            return None
        problem = reject_problem(str(v))
        if problem:
            raise ValueError(problem)
        return str(v)


class ClassifyJSON(ClassifyParams):
    image_b64: str = Field(
        ...,
        description="The image file (PNG, JPEG, WEBP, BMP or GIF), base64; a data: URL prefix is allowed.",
    )


class ClassifyResponse(BaseModel):
    label: str | None = Field(
        None,
        description="With reject on: the best label, or 'unknown' when the image's rejection "
        "score is below the threshold (labels still lists the best known ones).",
    )
    rejection_score: float | None = Field(
        None, description="With reject on: the rejection score (higher: more like a known class)."
    )
    labels: list[str] = Field(description="Best labels first.")
    scores: list[float | None] = Field(
        description="Their scores, higher is better (diffusion: -mean denoising error; clip: cosine); "
        "null where the hybrid prefilter never scored the class."
    )
    probs: list[float] | None = Field(
        None,
        description="Calibrated class probabilities of the same labels (softmax with a "
        "temperature fitted on the training shots; over all the set's classes, so the top-k "
        "sum to at most 1); null when the scorer has none (only fused has them).",
    )
    token_set: str
    scorer: Scorer
    batch_size: int = Field(description="Requests scored in the same batch as this one.")
    timings_ms: dict[str, float] = Field(
        description="parse (body), decode (image), queue (waiting for a batch), score (scorer call "
        "of this request's group), classifier (round trip to the classifier), total."
    )


class TokenSetInfo(BaseModel):
    id: str
    default: bool
    n_classes: int = Field(description="Classes of the set (all of them, listed or not).")
    labels: list[str] = Field(
        description="Its labels from `labels_offset`, at most the request's `limit`."
    )
    labels_offset: int = Field(description="Index of the first label listed.")
    next_offset: int | None = Field(
        description="The `offset` that lists the next labels; null when none are left."
    )
    base_model: str
    method: str | None = None


class TokenSetsResponse(BaseModel):
    default: str
    scorers: list[str] = Field(description="Scorers a request may choose.")
    default_scorer: str
    token_sets: list[TokenSetInfo]


class HealthResponse(BaseModel):
    status: str = Field(description="ok, busy, or degraded (see token_sets_error).")
    token_sets: int
    token_sets_error: str | None = Field(
        None,
        description="Why the last token sets given to the server were not applied (the "
        "previous ones still serve); absent when they were.",
    )


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(description="A label of the token set.")
    token_set: str | None = None
    n: int = Field(1, ge=1, le=4, description="Images in the grid.")
    steps: int = Field(
        15, ge=1, description="DDIM steps (at most the server's max_generate_steps)."
    )
    guidance: float = Field(3.0, ge=0, le=30, description="Classifier-free guidance scale.")
    seed: int = Field(0, ge=0, le=2**31 - 1)


class ErrorResponse(BaseModel):
    error: str = Field(description="What was wrong, in one line.")
