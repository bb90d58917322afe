import sys

from training.launch import main

rc = main()
if "torch.distributed" in sys.modules:  # leave cleanly (NCCL warns about a group left up)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
sys.exit(rc)
