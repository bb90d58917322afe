"""Training of class tokens, shared by `mcti train`, the DeepSpeed trainer (`training/`) and
`mcti pretrain`: `loop` (prepare, batches, loss, the single-process loop, export), `checkpoint`
(safetensors + JSON checkpoints, the same-run check), `runlog` (metrics.jsonl), `outdir` (the
lock on --out, the resume refusal)."""
