"""How fast does the default model learn per epoch under other training schedules? (issue 18)

    python -m benchmarks.probe_schedule cosine 0.01 4                      # lr 0.01 cosine-decayed to 0 over 4 epochs
    python -m benchmarks.probe_schedule halving 0.02 4                     # lr halved every epoch (per step)
    python -m benchmarks.probe_schedule constant 0.01 2 --batch-size 1024  # train.py's schedule, smaller batches
    python -m benchmarks.probe_schedule constant 0.01 2 --negatives 4 --batch-size 10240

Trains `python train.py --data ml-1m` (seed 0, 2 threads, any extra train.py flags) for a fixed
number of epochs with the learning rate set before every step by the named schedule, and prints
validation NDCG@10 after each epoch and test NDCG@10 at the end, with the wall time. It reuses
train.py's batches, model and evaluation; only the schedule is new, and it is not an option of
train.py: the probes measured none better than train.py's constant rate (docs/RESULTS.md, "Can the
default reach 0.52 in 5 minutes?"). A probe, not a run: nothing is written or recorded.
"""

import argparse
import math
import time

import numpy as np
import torch

import planrec
import train

SCHEDULES = {
    "constant": lambda lr, t, total, per_epoch: lr,                                   # train.py's
    "cosine": lambda lr, t, total, per_epoch: lr * 0.5 * (1 + math.cos(math.pi * t / total)),
    "linear": lambda lr, t, total, per_epoch: lr * (1 - t / total),
    "halving": lambda lr, t, total, per_epoch: lr * 0.5 ** (t / per_epoch),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("schedule", choices=sorted(SCHEDULES))
    p.add_argument("lr", type=float, help="the rate at step 0")
    p.add_argument("epochs", type=int)
    p.add_argument("--threads", type=int, default=2)
    args, train_flags = p.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    targs = train.parse_args(["--data", "ml-1m", "--out", "unused", *train_flags])
    data = train.load_data(targs.data, targs.data_dir, train.data_options(targs))
    cfg = train.model_config(targs, data)
    torch.manual_seed(targs.seed)
    rng = np.random.default_rng(targs.seed)
    device = torch.device("cpu")
    kernels, _ = train.pick_kernels("auto", device)
    model = planrec.PlanRec(cfg, **kernels)
    optimizer = train.make_optimizer(targs.optimizer, model.parameters(), args.lr)
    per_epoch = math.ceil(len(data.train_user) / (targs.batch_size // (1 + targs.negatives)))
    total, step_count, started = args.epochs * per_epoch, 0, time.time()
    rate = SCHEDULES[args.schedule]
    for epoch in range(1, args.epochs + 1):
        model.train()
        for step, batch in enumerate(train.train_batches(model, data, targs, rng)):
            if step >= per_epoch:
                break
            for group in optimizer.param_groups:
                group["lr"] = rate(args.lr, step_count, total, per_epoch)
            inputs = {k: train.to_device(batch[k], device) for k in train.MODEL_INPUTS if k in batch}
            labels = torch.zeros(inputs["items"].shape)
            labels[:, 0] = 1.0
            loss, _ = model.loss(model(**inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_count += 1
        valid, _ = train.evaluate(model, data, "valid", device, targs.seed)
        print(f"{args.schedule} lr {args.lr} epoch {epoch}: valid NDCG@10 {valid['ndcg@10']:.4f} "
              f"({time.time() - started:.0f} s)", flush=True)
    test, _ = train.evaluate(model, data, "test", device, targs.seed)
    print(f"{args.schedule} lr {args.lr}: test NDCG@10 {test['ndcg@10']:.4f} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
