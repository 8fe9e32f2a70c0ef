"""Your own training loop, with dtrain's checkpoints, agreed early stopping, preemption and sampler.

    torchrun --nproc-per-node 2 examples/own_loop.py --ckpt /tmp/own-loop
    # run it again: it resumes; send SIGTERM: it saves, agrees and exits 75

No dtrain Trainer here: a plain PyTorch loop on the digits task, DDP when there are several ranks.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import dtrain
from dtrain.models import digits


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True, help="checkpoint root: a path or any fsspec URL")
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64, help="global batch over all ranks")
    args = p.parse_args()

    # The handler first: a SIGTERM while the job starts (group, data, restore) is kept for the first
    # step boundary, which saves and exits 75, instead of killing the rank with -15.
    with dtrain.PreemptionHandler() as preempt, dtrain.distributed() as env:
        torch.manual_seed(0)  # same initial weights on every rank
        train_ds, val_ds = digits.build_datasets(digits.DigitsDataConfig(), seed=0)
        model = digits.build_model(digits.DigitsModelConfig(dropout=0.1))
        ddp = DDP(model) if env.world_size > 1 else model
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        sampler = dtrain.ResumableDistributedSampler(len(train_ds), args.batch_size, 1, env.rank, env.world_size,
                                                     seed=0)
        stopper = dtrain.EarlyStopping(monitor="val/loss", mode="min", patience=3)
        ckpt = dtrain.CheckpointManager(args.ckpt, keep_last_n=2, keep_best_k=1, monitor="val/loss")
        state = {"sampler": sampler, "early_stopping": stopper}
        restored = ckpt.restore_latest(model=ddp, optimizer=opt, stateful=state)
        step = restored[1]["step"] if restored else 0

        # Its own generator: from the global one, the loader's seed draw would follow the RNG state
        # the restore just set, and shift every dropout mask of a resumed run by one number.
        loader = iter(torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, generator=torch.Generator()))
        agreement, code = dtrain.StepAgreement(), dtrain.exitcodes.OK
        while step < args.max_steps and not stopper.should_stop:  # a finished run stays finished
            x, y = next(loader)
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            sampler.advance(args.batch_size)

            flags = dtrain.Flag.PREEMPT if preempt.requested else dtrain.Flag.NONE
            evaluating = step % args.eval_every == 0
            if evaluating:
                model.eval()
                with torch.no_grad():  # each rank has the whole (small) validation set here
                    val_loss = F.cross_entropy(model(val_ds.tensors[0]), val_ds.tensors[1]).item()
                model.train()
                val_loss = dtrain.all_reduce_mean(val_loss)  # identical on every rank
                if stopper.update(val_loss, step):
                    flags |= dtrain.Flag.EARLY_STOP
            agreed = agreement.step(flags, sync=evaluating)  # one collective per step, all ranks agree
            if evaluating or agreed.stops:
                ckpt.save(step, model=ddp, optimizer=opt, stateful=state, extra={"step": step},
                          metrics={"val/loss": val_loss} if evaluating else None)
            if agreed & dtrain.Flag.PREEMPT:
                code = dtrain.exitcodes.PREEMPTED
                break
            if agreed & dtrain.Flag.EARLY_STOP:
                break
        agreement.drain()
        ckpt.close()  # waits for any in-flight async save
        if env.is_main:
            best = "none yet" if stopper.best is None else f"{stopper.best:.4f} at step {stopper.best_step}"
            print(f"stopped at step {step}: best val/loss {best}, exit code {code}", flush=True)
        dtrain.barrier()  # nobody exits (and gets torchrun to kill the rest) before all are done
    return code


if __name__ == "__main__":
    sys.exit(main())
