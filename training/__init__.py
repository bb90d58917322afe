"""Data-parallel MC-TI training with DeepSpeed (`python -m training`, `mcti train --nproc N`)."""
