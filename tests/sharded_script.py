"""Sharded training on 2 CPU processes (gloo), run by tests/test_sharded.py.

``python tests/sharded_script.py OUT`` runs, on the same two processes (Lightning's
launcher starts the second): DDP (each rank on its half of every batch, a NaN on rank 1 at
step 4), FSDP2 (``ModelParallelStrategy`` with ``fully_shard`` over the data-parallel mesh,
the same halves and NaN, the guard deferred), tensor parallelism
(``ModelParallelStrategy``: a column- and a row-wise ``Linear`` over the tensor-parallel
mesh, a ``LayerNorm`` left replicated, every rank on the whole batch) and a plain loop with
``fully_shard`` and :func:`lr_monitor.attach`. Each rank writes what it saw to
``OUT/<mode><rank>.json``; :func:`fit` and :func:`plain_loop` unsharded are the oracle runs
(same initial weights, same global batches).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lr_monitor import DivergenceGuard, StepSizeMonitor, attach

#: Optimizer steps per run, the step whose loss is NaN (FSDP2 and its oracle).
STEPS, NAN_AT = 8, 4


class ShardedRegressor(pl.LightningModule):
    """LayerNorm → Linear(8, 16) → Tanh → Linear(16, 1), sharded by ``configure_model``.

    The last layer's weight (1 × 16) and bias (1) leave rank 1 an empty FSDP2 shard.

    Args:
        parallel: ``"ddp"``, ``"fsdp2"``, ``"tp"`` or ``None`` (one process: the oracle).
        nan_at: The step whose loss is NaN (rank 1's half under DDP and FSDP2; the same
            half in the oracle), or ``None``.
    """

    def __init__(self, parallel: str | None, nan_at: int | None = None) -> None:
        super().__init__()
        self.parallel, self.nan_at = parallel, nan_at
        self.net = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 16),
                                       torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def configure_model(self) -> None:
        if self.parallel == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[1], self.net[3]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)
        elif self.parallel == "tp":
            from torch.distributed.tensor.parallel import (
                ColwiseParallel,
                RowwiseParallel,
                parallelize_module,
            )

            parallelize_module(self.net, self.device_mesh["tensor_parallel"],
                               {"1": ColwiseParallel(), "3": RowwiseParallel()})

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        halves = list(zip(x.chunk(2), y.chunk(2), strict=True))
        if self.parallel in ("ddp", "fsdp2"):  # each data-parallel rank on its half
            halves = halves[self.global_rank:self.global_rank + 1]
        losses = [torch.nn.functional.mse_loss(self.net(a), b) for a, b in halves]
        if self.global_step == self.nan_at and (self.parallel is None or self.global_rank == 1):
            losses[-1] = losses[-1] * float("nan")  # rank 1's half only
        return torch.stack(losses).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * 32, 8, generator=g)
    y = x.sum(1, keepdim=True).tanh() + 0.1 * torch.randn(STEPS * 32, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32)


def _full(t: torch.Tensor) -> list[float]:
    full = t.full_tensor() if hasattr(t, "full_tensor") else t  # (a collective for DTensors)
    return full.detach().reshape(-1).tolist()


def fit(parallel: str | None, root: Path, strategy: Any = None, *, nan: bool = True,
        deferred: bool = False) -> dict[str, Any]:
    """Train with a guard and a monitor recording every step; what they saw, as JSON types.

    Returns:
        ``guard``: ``[step, values]`` the guard's detectors got; ``records``:
        ``[index, rows]`` of the monitor; ``events``; ``params`` (full, after the run).
    """
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = ShardedRegressor(parallel, nan_at=NAN_AT if nan else None)
    guard = DivergenceGuard(jsonl=False, log_events=False, deferred=deferred)
    seen: list[list[Any]] = []
    detect = guard.bank.detect

    def spy(index: int, step: int, values: dict[str, float]) -> Any:
        seen.append([step, dict(values)])
        return detect(index, step, values)

    guard.bank.detect = spy  # type: ignore[method-assign]
    monitor = StepSizeMonitor(1, granularity="tensor")
    records: list[list[Any]] = []
    monitor.subscribe(lambda r: records.append([r.index, r.rows]))
    kwargs: dict[str, Any] = {"devices": 1} if strategy is None else \
        {"devices": 2, "strategy": strategy}
    trainer = pl.Trainer(accelerator="cpu", max_steps=STEPS, callbacks=[monitor, guard],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False,
                         default_root_dir=str(root), **kwargs)
    trainer.fit(model, loader())
    return {"guard": seen, "records": records,
            "events": [[e.step, e.kind, list(e.actions)] for e in guard.events],
            "faults": [f.message for f in guard.faults.faults + monitor.faults.faults],
            "params": {n: _full(p) for n, p in model.named_parameters()},
            "global_step": trainer.global_step}


def plain_loop(sharded: bool) -> list[list[Any]]:
    """Three Adam steps in a loop without Lightning, recorded by :func:`attach`."""
    torch.manual_seed(0)
    net = ShardedRegressor(None).net
    rank = 0
    if sharded:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        rank = dist.get_rank()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in (net[1], net[3], net):
            fully_shard(layer, mesh=mesh)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    records: list[list[Any]] = []
    handle = attach(opt, lambda metrics, step: None, model=net, granularity="tensor")
    handle.subscribe(lambda r: records.append([r.index, r.rows]))
    for x, y in list(loader())[:3]:
        halves = list(zip(x.chunk(2), y.chunk(2), strict=True))
        if sharded:
            halves = halves[rank:rank + 1]
        loss = torch.stack([torch.nn.functional.mse_loss(net(a), b) for a, b in halves]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    handle.detach()
    return records


def main(out: Path) -> None:
    from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy

    warnings.filterwarnings("ignore")
    runs: dict[str, tuple[Any, dict[str, bool]]] = {
        "ddp": (DDPStrategy(), {}),
        "fsdp2": (ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                  {"deferred": True}),
        "tp": (ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2),
               {"nan": False}),
    }
    for mode, (strategy, options) in runs.items():
        result = fit(mode, out / mode, strategy, **options)
        rank = torch.distributed.get_rank()
        (out / f"{mode}{rank}.json").write_text(json.dumps(result))
    (out / f"attach{rank}.json").write_text(json.dumps(plain_loop(sharded=True)))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
