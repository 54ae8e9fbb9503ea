"""Run by tests/test_distributed.py under torchrun: one training run, then each rank saves its
own weights so the test can compare them. With CRASH_RANK=r, rank r fails in its third step."""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import speedrun


def main(data_dir, out_dir):
    cfg = speedrun.make_config(data_dir=data_dir, subset=512, test_subset=200, width=0.125, epochs=2, batch_size=64,
                               ghost_bn_splits=4, whiten_samples=128, device="cpu", eval_batch_size=100)
    ctx = speedrun.init_distributed(cfg)
    try:
        crash_rank = int(os.environ.get("CRASH_RANK", "-1"))
        if ctx.rank == crash_rank:
            make = speedrun.make_step_fn

            def failing_make(*args, **kwargs):
                step_fn, forward, module = make(*args, **kwargs)
                calls = []

                def step(xb, yb):
                    calls.append(1)
                    if len(calls) == 3:
                        raise RuntimeError(f"injected failure on rank {ctx.rank}")
                    return step_fn(xb, yb)
                return step, forward, module
            speedrun.make_step_fn = failing_make
        result = speedrun.train(cfg, log=lambda *a: None)
        torch.save({k: v.clone() for k, v in result["model"].state_dict().items()}, Path(out_dir) / f"rank{ctx.rank}.pt")
        if ctx.rank == 0:
            torch.save({k: v for k, v in result.items() if k != "model"}, Path(out_dir) / "result.pt")
        dist.barrier()  # as speedrun.main does: nobody tears down while another still communicates
    finally:
        speedrun.leave_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:3])
