"""`mcti train`: learn one token per class (single process, or DeepSpeed with --nproc > 1)."""

from mcti.errors import UserError
from mcti.settings import TrainArgs


def run(a: TrainArgs) -> None:
    if a.nproc > 1 and a.fit_folds:  # the DeepSpeed trainer writes no fused scorer state
        raise UserError("--fit-folds trains in one process: drop --nproc")
    if a.nproc > 1:  # one-machine shortcut for the DeepSpeed data-parallel trainer
        from training.launch import launch_local

        launch_local(a)
        return
    if a.hard_negatives:  # the single-process loop samples negatives uniformly
        raise UserError(
            "--hard-negatives needs the DeepSpeed trainer: add --nproc 2 (or more), or run "
            "`python -m training` under torchrun"
        )
    from mcti.train.loop import train

    p = train(a)
    print(
        f"wrote {p.tokens.num_classes} class tokens to {a.out}/learned_embeds.safetensors and {a.out}/classes.json"
    )
