"""MC-TI: multi-class textual inversion — learn one token per class without class names,
then classify (diffusion classifier) and generate with a Stable-Diffusion-style model."""

__version__ = "0.1.0"
