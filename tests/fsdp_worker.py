"""The training run of the FSDP test (tests/test_training_memory.py): one process in the test itself, or each of the
processes of ``torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT`` (with loop.fsdp). The loss draws from no global
generator, so n processes compute the mean loss of the same global batch as one."""

import os
import sys

import torch

from accelkit.data import BatchSampler, load_dataset
from accelkit.models.builtin import MLP
from accelkit.training import LoopConfig, Trainer


def noise(g, n):
    return {"t": torch.rand(n, generator=g), "eps": torch.randn(n, 2, generator=g)}


def loss(model, b):
    t = b["t"][:, None]
    x = (1 - t) * b["x"] + t * b["eps"]
    return ((model(x, b["t"] * 1000) - (b["eps"] - b["x"])) ** 2).sum(1).mean()


def trainer(checkpoint_dir, steps, rank=0, world=1, **cfg) -> Trainer:
    torch.manual_seed(123)
    data = BatchSampler(load_dataset("moons", 2000, 0).samples, 32, seed=7, rank=rank, world=world, noise=noise)
    config = LoopConfig(steps=steps, lr=3e-3, ema_rates=[0.9], warmup_steps=5, checkpoint_every=10,
                        checkpoint_interval_s=0, log_every=5, **cfg)
    return Trainer(MLP(2, 32, 2), loss, data, config, checkpoint_dir=checkpoint_dir, progress=False, device="cpu")


if __name__ == "__main__":
    from safetensors.torch import save_file

    out = sys.argv[1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    first = trainer(f"{out}/checkpoint", 20, rank, world, fsdp=True)
    local = next(first.model.parameters())
    shard_rows = torch.tensor([local.to_local().shape[0], local.shape[0]])  # this process's rows, all rows
    first.fit()  # ends at step 20 with a checkpoint
    second = trainer(f"{out}/checkpoint", 40, rank, world, fsdp=True)
    second.fit()  # resumes from it on the sharded model, then gathers the full weights
    if rank == 0:
        tensors = {**{f"model.{k}": v for k, v in second.model.state_dict().items()},
                   **{f"ema.{k}": v for k, v in second.ema_weights(0.9).items()},
                   "loss": torch.tensor([h["loss"] for h in second.history]),
                   "shard_rows": shard_rows}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, f"{out}/result.safetensors")
