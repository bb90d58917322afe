"""One settings schema for every command, the Serve config and the demo.

Groups of settings are dataclasses declared once, each field with its docstring (the `--help`
text and the Serve config's description), its type (`Literal` choices become argparse `choices`
and are checked at parse time) and its bounds (`Annotated[int, Bounds(ge=1)]`). A command's
settings are composed from the groups by inheritance, so attribute access stays flat
(`a.lr`, `a.scorer`). Every object checks itself when it is built (`check_settings`), so a typo
fails before any model loads, whoever builds it: the CLI (mcti/flags.py), the Serve config
(serving/config.py builds its pydantic model from `ServeSettings`) or Python code.

This module imports nothing heavy (no torch, no pydantic): `mcti --help` reads it. It is
longer than our other modules on purpose: every setting of the project, in one place, is the
point (the field docstrings are most of it).
"""

import ast
import dataclasses
import functools
import inspect
import string
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Annotated, ClassVar, Literal, TypeVar

from mcti.errors import UserError

DEFAULT_MODEL = "embedded"  # the base model a command uses unless told

# ---------------------------------------------------------------------------------------------
# Choices, bounds and checks: markers the CLI and the Serve config both read


Scorer = Literal["diffusion", "clip", "hybrid", "fused"]
Precision = Literal["fp32", "bf16", "fp16"]
Attention = Literal["auto", "sdpa", "xformers"]
Method = Literal["mcti", "ti"]
Reg = Literal["denoise", "clip"]
SCORERS: tuple[str, ...] = typing.get_args(Scorer)


@dataclass(frozen=True)
class Bounds:
    """Numeric bounds of a field (None: no bound on that side)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def problem(self, v: float) -> str | None:
        if self.ge is not None and v < self.ge:
            return f"must be >= {self.ge:g}"
        if self.gt is not None and v <= self.gt:
            return f"must be > {self.gt:g}"
        if self.le is not None and v > self.le:
            return f"must be <= {self.le:g}"
        return None


@dataclass(frozen=True)
class Check:
    """A check of a value: `problem(value)` is None when it is fine, else what is wrong
    ("must ..."); the caller adds the setting's name and the value."""

    problem: Callable[[typing.Any], str | None]


@dataclass(frozen=True)
class Output:
    """A path the command writes: a directory ("dir") or a file ("file"). The CLI checks it
    before any model loads (mcti/flags.py `check_outputs`)."""

    kind: Literal["dir", "file"]


def template_problem(template: str) -> str | None:
    """Why `template` is not a prompt template (None if it is): it needs exactly one `{}`, where
    the class token goes ("a photo" would give every class the same prompt; "a {x}" cannot be
    filled). Literal braces are written `{{` and `}}`."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:
        parts = None
    slots = [p for p in parts or [] if p[1] is not None]
    if parts is None or len(slots) != 1 or slots[0][1:] != ("", "", None):
        return "must contain exactly one {}, where the class token goes"
    return None


def stages_problem(spec: str) -> str | None:
    """Why `spec` is not a comma-separated list of positive integers (None if it is)."""
    try:
        ok = all(int(x) >= 1 for x in spec.split(","))
    except ValueError:
        ok = False
    return None if ok else "must be comma-separated positive integers, e.g. 8,16,32"


def reject_problem(value: str) -> str | None:
    """Why `value` is not a --reject setting (None if it is): off, auto or a number."""
    if value in ("off", "auto"):
        return None
    try:
        float(value)
    except ValueError:
        return "must be off, auto or a number (the rejection score's threshold)"
    return None


AtLeast1 = Annotated[int, Bounds(ge=1)]
AtLeast0 = Annotated[int, Bounds(ge=0)]
NonNegative = Annotated[float, Bounds(ge=0)]
Positive = Annotated[float, Bounds(gt=0)]
Fraction = Annotated[float, Bounds(ge=0, le=1)]
Template = Annotated[str, Check(template_problem)]
Stages = Annotated[str, Check(stages_problem)]
OutDir = Annotated[str, Output("dir")]
OutFile = Annotated[str, Output("file")]


def unwrap(hint) -> tuple[type, tuple, bool]:
    """(base type, markers, optional) of a field's type hint: Optional and Annotated peeled off."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = len(args) < len(typing.get_args(hint)), args[0]
    markers: tuple = ()
    if typing.get_origin(hint) is Annotated:
        hint, *rest = typing.get_args(hint)
        markers = tuple(rest)
    return hint, markers, optional


@functools.cache
def field_types(cls: type) -> dict[str, tuple[type, tuple, bool]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: unwrap(hints[f.name]) for f in fields(cls)}


def value_problem(cls: type, name: str, value) -> str | None:
    """What is wrong with `value` for field `name` of `cls` ("must ..."), or None."""
    tp, markers, optional = field_types(cls)[name]
    if value is None:
        return None if optional else "must be set"
    items = value if typing.get_origin(tp) is list else [value]
    if typing.get_origin(tp) is list:
        tp = typing.get_args(tp)[0]
    for item in items:
        if typing.get_origin(tp) is Literal and item not in typing.get_args(tp):
            return f"must be one of {', '.join(map(str, typing.get_args(tp)))}"
        for m in markers:
            problem = m.problem(item) if isinstance(m, Bounds | Check) else None
            if problem:
                return problem
    return None


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right after each field) of cls and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def flag_of(f) -> str:
    """The command-line flag of a dataclass field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_settings(obj) -> None:
    """Raise UserError naming the first field of `obj` that breaks its choices, bounds or check."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        problem = value_problem(type(obj), f.name, value)
        if problem:
            raise UserError(f"{flag_of(f)} {problem} (not {value!r})")


class Settings:
    """Base of every settings dataclass: an object that breaks the schema cannot be built."""

    def __post_init__(self) -> None:
        check_settings(self)


G = TypeVar("G")


def part(group: type[G], obj) -> G:
    """The `group` settings held by `obj` (a composed settings object, or any object with those
    attributes, such as the Serve AppConfig)."""
    return group(**{f.name: getattr(obj, f.name) for f in fields(group)})


# ---------------------------------------------------------------------------------------------
# Groups


@dataclass
class ModelSettings(Settings):
    model: str | None = None
    """Base model: a diffusers-format directory (e.g. a local Stable Diffusion 1.x/2.x copy), 'embedded' (shipped with mcti) or 'tiny-random' (tests). Default: 'embedded' for train; for commands that read tokens, the model the tokens were trained on."""
    clip: str | None = None
    """A transformers CLIPModel directory matching the text encoder (for --reg clip / --scorer clip) when the model has no clip/ folder."""
    device: str = "auto"
    """auto (CUDA if available), cpu, cuda or cuda:N."""
    precision: Precision = "fp32"
    """fp32, bf16 or fp16 for the frozen UNet/VAE (bf16/fp16 need CUDA); errors and losses accumulate in fp32."""
    attention: Attention = "auto"
    """UNet attention: auto (xformers on CUDA if installed, else PyTorch SDPA), sdpa or xformers."""


@dataclass
class ScorerSettings(Settings):
    scorer: Scorer = "diffusion"
    """diffusion (per-class denoising error), clip (CLIP cosine), hybrid (clip top-m, diffusion rerank) or fused (token CLIP scores + a cache of the shots' image features, weighted and calibrated on the shots; gives probabilities)."""
    n_samples: Stages = "8,16,32"
    """Diffusion scorer: cumulative (t, eps) samples per stage, comma-separated."""
    to_keep: Stages = "5,2,1"
    """Diffusion scorer: classes kept after each stage (last must be 1)."""
    hybrid_m: AtLeast1 = 10
    """Hybrid scorer: classes kept by the clip prefilter."""
    prefilter_m: AtLeast0 = 20
    """Diffusion scorer: with more classes than this, first keep the clip scorer's top this-many classes (as hybrid does), so UNet rows per image stay flat in K (8,16,32 / 5,2,1: 8 x 20 + 96 = 256 rows per image, whatever K; 8 K + 96 below); 0: off, every class through the full schedule (K x n_samples rows). K <= this is unchanged. Needs a model with a CLIP vision tower when K exceeds it."""
    batch_rows: AtLeast1 = 256
    """UNet rows (image x class x t) per forward pass."""
    template: Template = "a photo of a {}"
    """Prompt used for each class token; {} becomes the token."""
    seed: int = 0
    """Seed of the (t, eps) grid; scores are deterministic for a seed (the server's are those of `mcti classify` with the same seed)."""
    reject: Annotated[str, Check(reject_problem)] = "off"
    """Open set: label an image `unknown` when its rejection score (mcti/core/openset.py) is below a threshold: off, auto (set on the training shots, leave-one-out, for --known-recall; saved with the tokens) or a number (the threshold itself; write a negative one as --reject=-2.5). The server: the default of a request's `reject`."""
    known_recall: Annotated[float, Bounds(gt=0, le=1)] = 0.95
    """--reject auto: fraction of known-class images to accept."""
    stop_level: Fraction = 0.0
    """Diffusion scorer: significance level of early stopping (0: off, the full schedule). After each 8 timesteps a class whose paired per-t errors are significantly above the leader's (one-sided t test at this level, Bonferroni over the classes) is dropped, so easy images stop early; 0.05 measured in benchmarks/diffusion_rows.py."""


@dataclass
class ObjectiveSettings(Settings):
    method: Method = "mcti"
    """mcti (TI + discriminative term) or ti (plain textual inversion)."""
    reg: Reg = "denoise"
    """Discriminative term of mcti: denoise (per-class denoising errors) or clip (CLIP text-image)."""
    negatives: AtLeast0 = 4
    """Negative classes sampled per image for the discriminative term."""
    draws: AtLeast1 = 4
    """(t, eps) draws per image for --reg denoise, shared by its candidate classes."""
    tau: Positive = 0.002
    """Temperature of the denoise logits: logits = -error / tau (errors are MSEs ~0.01-0.1 whose class differences are ~1e-4-1e-3); with many shots per class (16) 0.01 measured better; with --standardize use ~0.5."""
    alpha: NonNegative = 1.0
    """Weight of the TI noise-prediction loss."""
    gamma: NonNegative = 0.1
    """Weight of the discriminative cross-entropy."""
    standardize: bool = False
    """Standardise per-class errors across the candidates of each (image, t) before the softmax (measured worse on the embedded model: see benchmarks/RESULTS.md)."""
    disc_t_min: Fraction = 0.05
    """Lowest timestep of the denoise term, as a fraction of the training timesteps."""
    disc_t_max: Fraction = 0.6
    """Highest timestep of the denoise term, as a fraction of the training timesteps."""
    prototype: bool = False
    """--reg clip: compare with each class's mean image embedding instead of a random shot."""
    flip: Fraction = 0.5
    """Probability of a horizontal flip of a training image."""

    std_floor: ClassVar[float] = 0.01  # --standardize: floor of the std, relative to the mean error

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.disc_t_min < self.disc_t_max:
            raise UserError("need 0 <= --disc-t-min < --disc-t-max <= 1")


@dataclass
class OptimSettings(Settings):
    steps: AtLeast1 = 200
    """Optimisation steps."""
    batch_size: AtLeast1 = 8
    """Images per step."""
    lr: Positive = 5e-3
    """AdamW learning rate of the token vectors."""
    weight_decay: NonNegative = 1e-2
    """AdamW weight decay."""


# ---------------------------------------------------------------------------------------------
# Commands (flat: every group's fields are attributes of the command's settings)


@dataclass
class ModelArgs(ModelSettings):
    """The base model of a command (kept as a name: other modules import it)."""


@dataclass
class TrainArgs(ObjectiveSettings, OptimSettings, ModelArgs):
    data: str = ""
    """Image-folder tree DATA/<label>/<image> (labels are opaque keys, never read as text), or a benchmark `coop:<name>:<root>` (see README)."""
    out: OutDir = ""
    """Output token directory (learned_embeds.safetensors, classes.json, checkpoint/)."""
    shots: AtLeast1 = 5
    """Training images per class, picked reproducibly by --seed."""
    seed: int = 0
    """Seed for the shot pick and every random draw (runs are reproducible)."""
    n_vectors: AtLeast1 = 1
    """Embedding vectors per class token."""
    init_word: str = "object"
    """Generic initializer word, the same for every class (never derived from labels)."""
    save_every: AtLeast1 = 50
    """Write a resumable checkpoint every N steps (and at the end)."""
    resume: bool = False
    """Continue from OUT/checkpoint if it exists."""
    quiet: bool = False
    """No progress bar."""
    nproc: AtLeast1 = 1
    """Data-parallel processes on this machine (>1 runs the DeepSpeed trainer via torchrun)."""
    hard_negatives: bool = False
    """Draw the --negatives of each image by similarity to its class's current token (weights exp((cos - 1) / --hard-temperature) of the centred token vectors) instead of uniformly. DeepSpeed trainer only: with --nproc > 1 (or python -m training)."""
    extend: str | None = None
    """Extend this token directory: learn tokens only for the labels of --data it lacks (the old tokens stay frozen, bit for bit, and serve as negatives) and write the merged set to --out. Same base model as the old set (its model is the default)."""
    replace: bool = False
    """--extend: retrain the labels of --data that the old set already has (refused without it); the other old classes stay frozen."""
    fit_folds: AtLeast0 = 0
    """Fused scorer: also train this many token sets, each without one fold of the shots, and fit the fused scorer's weights on the held-out folds' scores (evidence the tokens did not train on; it adds the diffusion part). Costs this many extra trainings; 0: weights fitted on the tokens' own shots with a fixed token shrink, no diffusion part. Needs 2 <= N <= --shots."""
    fused_m: AtLeast0 = 3
    """--fit-folds: classes (the shot cache's top m) whose denoising errors the fused scorer's diffusion part measures per image (0: no diffusion part)."""
    fused_timesteps: AtLeast1 = 8
    """--fit-folds: (t, eps) pairs per candidate class of the diffusion part (UNet rows per image: --fused-m x this)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fit_folds == 1 or self.fit_folds > self.shots:
            raise UserError(
                f"--fit-folds must be 0 or between 2 and --shots ({self.shots}), not {self.fit_folds}"
            )


@dataclass
class ScoreArgs(ScorerSettings, ModelArgs):
    tokens: str = ""
    """Token directory written by `mcti train`."""
    batch_images: AtLeast1 = 16
    """Images scored together (their rows share UNet passes)."""


@dataclass
class EvalArgs(ScoreArgs):
    data: str = ""
    """Labelled image-folder tree DATA/<label>/<image> (labels must be those of the tokens), or `coop:<name>:<root>` (its test split)."""
    include_train: bool = False
    """Also evaluate the images the tokens were trained on (excluded by default)."""
    limit: AtLeast0 = 0
    """Evaluate at most N images per class (0: all)."""
    json: bool = False
    """Print one JSON object instead of tables."""
    plot: Annotated[str, Output("file")] | None = None
    """Write a confusion-matrix PNG here (after the results are printed; the path is checked first); with --unknown, a histogram of the rejection score of known vs unknown images."""
    unknown: str | None = None
    """Open set: a folder (any tree of image files) of classes not in the token set; reports AUROC, FPR at 95 percent known recall and rejected fractions (with --reject auto unless set)."""


@dataclass
class ClassifyArgs(ScoreArgs):
    images: list[str] = field(default_factory=list, metadata={"positional": True})
    """Image files to classify."""
    top_k: AtLeast1 = 5
    """Labels shown per image."""
    json: bool = False
    """Print a JSON list instead of text."""


@dataclass
class GenerateArgs(ModelArgs):
    tokens: str = ""
    """Token directory written by `mcti train`."""
    label: str = ""
    """Class label (a key of classes.json) to draw."""
    out: OutFile = ""
    """Output PNG (a grid of --n images)."""
    n: AtLeast1 = 4
    """Number of images."""
    prompt: Template = "a photo of a {}"
    """Prompt template; {} becomes the class token."""
    steps: AtLeast1 = 15
    """DDIM sampling steps (15 measured best on the embedded model; a Stable Diffusion model wants ~50)."""
    guidance: NonNegative = 3.0
    """Classifier-free guidance scale (1 = none; 3 measured best on the embedded model, ~7.5 suits Stable Diffusion)."""
    seed: int = 0
    """Sampling seed."""


@dataclass
class ServeSettings(ScorerSettings, ModelSettings):
    """Every setting of the Serve application: serving.config.AppConfig is built from these
    fields (same names, docstrings, choices and bounds), and `mcti serve` takes each as a flag."""

    model: str = DEFAULT_MODEL
    """Base model the tokens were trained on: a diffusers directory, 'embedded' or 'tiny-random'."""
    tokens: str = ""
    """Token directory written by `mcti train`, or several as ID=DIR,ID=DIR (the first is the default set; all stay resident in every replica). In a config file also a mapping {id: dir}."""
    scorers: list[Scorer] | None = None
    """Scorers a request may pick (built at load time). Default: the default scorer, plus clip and hybrid when the model has a CLIP vision tower."""
    top_k: AtLeast1 = 5
    """Labels returned when a request does not say."""
    max_batch_size: AtLeast1 = 8
    """Concurrent requests scored in one scorer call (per token set and scorer)."""
    batch_wait_timeout_s: NonNegative = 0.0
    """How long a request waits for others to batch with. Requests that arrive while the model is busy join its next batch anyway; a wait only helps bursts that hit an idle replica (worth a few ms on a GPU), and costs that much at low load."""
    max_body_bytes: Annotated[int, Bounds(ge=1024)] = 10_000_000
    """Larger request bodies get 413."""
    max_pixels: AtLeast1 = 25_000_000
    """Images with more pixels (width x height) get 413, checked before decoding."""
    enable_generate: bool = field(default=True, metadata={"flag": "--no-generate"})
    """Serve POST /v1/generate (PNG of a class); the flag --no-generate turns it off."""
    max_generate_steps: AtLeast1 = 50
    """Upper bound of a generate request's steps."""
    max_generate_queue: AtLeast1 = 2
    """Generations a classifier replica holds at once (running or waiting); more get a fast 503. Scoring goes first: a generation yields the model between its denoising steps."""
    body_timeout_s: Positive = 30.0
    """A request body not fully received within this many seconds gets 408 (slow clients)."""
    num_replicas: AtLeast1 = field(default=1, metadata={"flag": "--replicas"})
    """Classifier replicas, each loads the model once (ignored when autoscaling)."""
    min_replicas: AtLeast0 | None = None
    """Autoscaling lower bound (set both bounds to autoscale)."""
    max_replicas: AtLeast1 | None = None
    """Autoscaling upper bound."""
    target_ongoing_requests: Positive = 8.0
    """Autoscaling target of in-flight requests per replica."""
    num_gpus: NonNegative = 0.0
    """GPUs per classifier replica."""
    num_cpus: NonNegative = 1.0
    """CPUs reserved per classifier replica (mcti serve: the local CPUs shared by the replicas, unless set)."""
    torch_threads: AtLeast0 = 0
    """torch intra-op threads in a replica (0: max(1, num_cpus), Ray's default)."""
    max_ongoing_requests: AtLeast1 = 16
    """Requests a classifier replica holds at once (>= max_batch_size)."""
    max_queued_requests: AtLeast0 = 32
    """Requests waiting for a classifier replica, per ingress replica; more get a fast 503."""
    ingress_replicas: AtLeast1 = 1
    """HTTP ingress replicas (decode + validation)."""


@dataclass
class ServeArgs(ServeSettings):
    """`mcti serve`: the Serve settings plus where to listen. Settings come from --config FILE,
    then from the flags given on the command line."""

    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 to accept other machines)."""
    port: Annotated[int, Bounds(ge=0, le=65535)] = 8000
    """HTTP port."""
    config: str | None = None
    """YAML file with serving settings (the keys are these settings' names, as in serving.config.AppConfig, or a Serve config file such as serving/serve_config.yaml); flags given on the command line override it."""
    cpus: AtLeast0 = 0
    """CPUs of the local Ray instance (0: all); the classifier replicas share them."""
    given: tuple[str, ...] | None = field(default=None, metadata={"cli": False})
    """Names of the settings given on the command line (filled by the CLI); None: built in
    Python, where every value other than the default counts as given."""


@dataclass
class DemoArgs(ObjectiveSettings):
    out: OutDir = "mcti-demo"
    """Output folder (data/, tokens/, confusion.png, samples.png, summary.json)."""
    model: str = "embedded"
    """Base model: 'embedded' (shipped), 'tiny-random' or a diffusers directory."""
    dataset: str = "animal-mnist"
    """Offline dataset: animal-mnist, fashion-mnist or digits (see mcti/data/offline.py)."""
    shots: AtLeast1 = 5
    """Training images per class."""
    eval_per_class: AtLeast1 = 20
    """Held-out evaluation images per class."""
    reg: Reg = "clip"
    """Discriminative term of mcti: clip (cheap; CLIP text-image CE) or denoise (per-class denoising errors; several UNet passes per image)."""
    steps: AtLeast1 = 300
    """Token training steps."""
    batch_size: AtLeast1 = 8
    """Images per training step."""
    lr: Positive = 5e-3
    """Token learning rate."""
    negatives: AtLeast0 = 3
    """Negative classes per image (denoise/clip term)."""
    draws: AtLeast1 = 2
    """(t, eps) draws per image for the denoise term."""
    gamma: NonNegative = 0.05
    """Weight of the discriminative term."""
    n_samples: Stages = "4,8,16"
    """Diffusion scorer: cumulative timesteps per elimination stage."""
    to_keep: Stages = "3,2,1"
    """Diffusion scorer: classes kept after each stage."""
    samples_per_class: AtLeast1 = 4
    """Generated images per class in samples.png."""
    sample_steps: AtLeast1 = 15
    """DDIM steps for the samples."""
    guidance: NonNegative = 3.0
    """Classifier-free guidance scale for the samples."""
    seed: int = 0
    """Seed of the shot pick, training and scoring."""
    reference: bool = False
    """Also score the test images zero-shot with the true class names (a reference the method never sees; doubles the scoring time)."""
    threads: AtLeast0 = 1
    """torch CPU threads (0: torch's default). 1 is fastest on a busy shared machine: with 2 threads under load the same run took several times the CPU time."""
    device: str = "auto"
    """auto, cpu or cuda."""
    quick: bool = False
    """Smoke-test setting (seconds): 3 classes, few images and steps."""
    force: bool = False
    """Overwrite an existing output folder."""


@dataclass
class SynthArgs(Settings):
    """`mcti synth`: the many-class synthetic image set (mcti/data/synth.py)."""

    out: OutDir = ""
    """Output folder (train/, test/, synth.json); refused if it exists and is not empty, unless --force."""
    classes: int = 100
    """Number of classes K (at most mcti.data.synth.MAX_CLASSES = 2240)."""
    per_class: int = 25
    """Images per class, train and test together."""
    train_per_class: int = 5
    """Images per class in train/ (the shots); the other per-class images go to test/."""
    seed: int = 0
    """Seed: which K glyph/colour designs, in which order, and every image's jitter. Same seed and settings, same bytes."""
    size: int = 32
    """Image side in pixels (the embedded model resizes to its 16x16 input)."""
    force: bool = False
    """Replace an existing non-empty --out folder."""


# --- pretraining (the embedded model's recipe) ---

AtLeast2 = Annotated[int, Bounds(ge=2)]  # contrastive and balanced batches need two images


@dataclass
class PretrainArgs(Settings):
    """`mcti pretrain`: the embedded model's recipe (mcti/pretrain/)."""

    out: OutDir = ""
    """Output model directory (diffusers format + clip/); also holds checkpoint/ and the log."""
    steps: AtLeast1 = 3078
    """Denoiser (UNet) training steps (3078: the shipped embedded model)."""
    clip_steps: AtLeast0 = 1500
    """Contrastive CLIP steps (stage 1)."""
    minutes: NonNegative = 0.0
    """Stop the denoiser stage after this many minutes of training (0: no limit); the model records the steps done, which `--steps` reproduces."""
    batch_size: AtLeast2 = 32
    """Denoiser batch size."""
    clip_batch_size: AtLeast2 = 128
    """CLIP batch size."""
    lr: Positive = 5e-4
    """Denoiser AdamW learning rate (constant after warm-up)."""
    clip_lr: Positive = 1e-3
    """CLIP AdamW learning rate (cosine decay)."""
    ema: Fraction = 0.999
    """EMA decay of the denoiser weights (the EMA weights are what is saved)."""
    caption_dropout: Fraction = 0.1
    """Fraction of denoiser steps' captions replaced by the empty prompt (for guidance)."""
    generic_captions: Fraction = 0.05
    """Fraction of captions that say the generic word ('a photo of a object') instead of the name."""
    resolution: int = 16
    """Image side in pixels (pixel-space model, no VAE)."""
    channels: str = "32,64,96"
    """UNet block channels, comma-separated (one CrossAttn block per entry)."""
    datasets: str = "animal-mnist,fashion-mnist,digits"
    """Offline datasets whose seen classes are the concepts (see mcti/data/offline.py)."""
    seed: int = 0
    """Seed of initialisation and every random draw."""
    threads: AtLeast0 = 1
    """torch CPU threads (0: torch's default)."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""
    eval_every: AtLeast0 = 500
    """Measure true-name accuracy on held-out seen-class images every N denoiser steps (0: never)."""
    eval_images: AtLeast1 = 30
    """Held-out images per dataset for the periodic accuracy (cheap 8-timestep diffusion scorer)."""
    snapshots: bool = False
    """Also keep the model of every evaluation point under OUT/snapshots/step-N."""
    resume: bool = False
    """Continue from OUT/checkpoint if present."""
    quick: bool = False
    """Tiny smoke-test setting (seconds): few steps, small data, tiny networks."""
    quiet: bool = False
    """No progress bars."""


@dataclass
class TokensInfoArgs(Settings):
    """show a token set's labels count, base model, method and settings, shots and history"""

    tokens: str = field(default="", metadata={"positional": True})
    """Token directory."""
    json: bool = False
    """Print one JSON object instead of text."""


@dataclass
class TokensListArgs(Settings):
    """print a token set's labels, one per line"""

    tokens: str = field(default="", metadata={"positional": True})
    """Token directory."""
    json: bool = False
    """Print a JSON list instead of lines."""


@dataclass
class TokensMergeArgs(Settings):
    """merge token sets trained on the same base model into one (no label in two sets)"""

    tokens: list[str] = field(default_factory=list, metadata={"positional": True})
    """Two or more token directories; their classes are kept in this order."""
    out: OutDir = ""
    """Output token directory (must not hold files yet)."""


@dataclass
class TokensRemoveArgs(Settings):
    """write a token set without some of its classes"""

    tokens: str = field(default="", metadata={"positional": True})
    """Token directory."""
    labels: list[str] = field(default_factory=list)
    """Labels to remove, comma-separated or one per argument (x,y or x y)."""
    out: OutDir = ""
    """Output token directory (must not hold files yet)."""


@dataclass
class TokensRenameArgs(Settings):
    """write a token set with some labels renamed"""

    tokens: str = field(default="", metadata={"positional": True})
    """Token directory."""
    mapping: list[str] = field(default_factory=list, metadata={"flag": "--map"})
    """Renames OLD=NEW, comma-separated or one per argument."""
    out: OutDir = ""
    """Output token directory (must not hold files yet)."""


@dataclass
class TokensArgs(Settings):
    """`mcti tokens SUBCOMMAND`: inspect and edit token directories (mcti/cli/tokens.py). The
    CLI builds one parser per subcommand from these classes."""

    SUBCOMMANDS: ClassVar[dict[str, type]] = {
        "info": TokensInfoArgs,
        "list": TokensListArgs,
        "merge": TokensMergeArgs,
        "remove": TokensRemoveArgs,
        "rename": TokensRenameArgs,
    }
