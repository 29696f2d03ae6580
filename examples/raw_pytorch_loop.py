"""Without Lightning: attach() in a plain loop, and the guard's building blocks by hand.

``lr_monitor.attach`` records the same statistics as the Lightning callback into a
``SummaryWriter``; the detectors and interventions are framework-free, so a raw loop can
skip bad steps, roll back and cut the LR itself (``DetectorBank`` and ``GuardPolicy`` in
``lr_monitor.guard`` are the guard's own rounds and rules, usable the same way)::

    python examples/raw_pytorch_loop.py --lr 0.5
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_diabetes
from torch.utils.tensorboard import SummaryWriter

import lr_monitor
from lr_monitor.guard.detectors import ExplosionDetector, NonFiniteDetector, SpikeDetector
from lr_monitor.guard.interventions import LRCut, RollbackBuffer, skip_step


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--out", default="lr_monitor_runs/examples/raw-loop")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(y, dtype=torch.float32).unsqueeze(1)
    y = (y - y.mean()) / y.std()
    model = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.RMSprop(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.max_steps)

    writer = SummaryWriter(args.out)
    handle = lr_monitor.attach(optimizer, writer, every_n_steps=10, model=model)
    nonfinite, explosion, spike = (NonFiniteDetector("loss"), ExplosionDetector("loss"),
                                   SpikeDetector("loss"))
    cut = LRCut(factor=0.1, cooldown=20, max_cuts=4)
    snapshots = RollbackBuffer(every_n_steps=20, keep=2)
    snapshots.take(0, model, [optimizer])
    log: list[str] = []
    for step in range(args.max_steps):
        idx = torch.randint(len(x), (32,))
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        value = loss.item()
        event = (nonfinite.update(step, value) or explosion.update(step, value)
                 or spike.update(step, value))
        if event is not None and event.kind == "spike":
            skip_step(optimizer)  # drop this step: parameters and moments stay as they are
            log.append(f"step {step}: spike ({event.message}); skipped")
        elif event is not None:
            # The weights are damaged: go back to a healthy snapshot (weights and moments;
            # the current LR and schedule stay; this step's gradients are dropped), then cut.
            restored = snapshots.roll_back(model, [optimizer])
            changed = cut.cut(step, optimizer, scheduler, ignore_cooldown=True)
            log.append(f"step {step}: {event.kind} ({event.message}); back to step "
                       f"{restored.step}, lr cut: {changed}")
        elif snapshots.due(step):
            snapshots.take(step, model, [optimizer])
        optimizer.step()
        scheduler.step()
        writer.add_scalar("train/loss", value, step)
    handle.detach()
    writer.close()
    print("\n".join(log) or "no event")
    print(f"final loss {value:.4f}; logs in {args.out}")
    return log


if __name__ == "__main__":
    main()
