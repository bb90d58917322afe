"""`mcti pretrain`: train the embedded base model from scratch on offline captioned images.

Two stages, both on the pretraining part of `mcti.data.offline`'s fixed split (novel classes and
held-out images are never touched):
1. CLIP: a small CLIP text tower and ViT vision tower trained contrastively on (image, caption)
   pairs. Captions name the concept the way web captions do ("a photo of a sneaker"); images
   whose captions name the same concept are all positives (soft targets).
2. Denoiser: a pixel-space UNet2DConditionModel (cross-attention at every resolution, plus the
   pooled text added to the time embedding) trained on the noise-prediction loss, conditioned
   on the *frozen* text tower's hidden states; EMA of weights; low caption dropout (so the
   classifier-free "" prompt exists for sampling, while almost every step teaches the UNet to
   use its text). The LR is constant after warm-up, so stopping after N steps gives exactly the
   model that `--steps N` reproduces.

Output: a diffusers-format directory without vae/ (model_index.json, unet/, text_encoder/,
tokenizer/, scheduler/) plus clip/ (transformers CLIPModel, text tower == text_encoder/), and
pretrain.json (recipe, data, timings, true-name accuracy curve). `mcti.core.model.load_model(DIR)`
loads it; the shipped `embedded` model is one such directory.

The modules, in the order a run uses them (the arguments are `mcti.settings.PretrainArgs`):

    corpus.py       images of the seen classes, captions, the tokenizer's words, batches
    networks.py     tokenizer, CLIP, UNet, scheduler; the output directory
    clip_stage.py   stage 1
    denoiser.py     stage 2
    checkpoint.py   OUT/checkpoint/state.pt (tensors and plain values only)
    pipeline.py     the run: both stages, periodic true-name accuracy, checkpoints, output
    release.py      measure a model and ship it with MODEL_CARD.md and SHA256SUMS
"""

from mcti.settings import PretrainArgs

__all__ = ["PretrainArgs", "run"]


def run(a: PretrainArgs) -> None:
    """The `mcti pretrain` command (torch and the networks load only when it runs)."""
    from mcti.pretrain.pipeline import pretrain

    pretrain(a)
