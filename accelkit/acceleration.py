"""Running a teacher's network faster without changing what it computes: ``torch.compile`` and CUDA graphs.

Both act on the networks of every :class:`~accelkit.teacher.NetworkTeacher` inside a teacher (a rescaled teacher
reaches its base), so solvers, guidance and conditioning keep working unchanged:

* **compile**: the network's forward is compiled in place by ``torch.compile`` (``nn.Module.compile``: inductor
  kernels, on the CPU too; the state dict keeps its keys). The first call of each input shape pays the compilation.
* **CUDA graphs**: each network call (one NFE; with guidance the conditional and null rows are one batched call) is
  captured once per input signature into a CUDA graph with static input buffers, then replayed: the inputs are
  copied into the buffers, one launch runs every kernel of the network, and the output buffer is copied out (a
  multistep solver keeps earlier outputs). A fixed-grid solver calls the network with the same shapes at every
  step, so an N-step solve captures one graph and replays it N times; the solver's few elementwise kernels between
  the replays launch as before, and its loop has no host synchronisation (see :mod:`accelkit.solvers.base`).
  Solvers that change the batch from round to round (``picard:`` / ``parallel:``) are refused.

Replaying a captured graph runs the very kernels the eager call runs, on the same inputs: graphed samples equal
eager ones (tests/test_cuda.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn

from .errors import AccelkitError
from .teacher import Condition, NetworkTeacher, Teacher


def network_teachers(teacher: Teacher) -> list[NetworkTeacher]:
    """Every :class:`NetworkTeacher` in ``teacher`` (itself, or the base of a rescaled / wrapped teacher)."""
    return [m for m in teacher.modules() if isinstance(m, NetworkTeacher)]


def _condition_like(cond: Condition | None, tensors: dict[str, Tensor]) -> Condition | None:
    """A Condition with ``cond``'s fields, holding ``tensors['cond.<field>']``."""
    if cond is None:
        return None
    known = {f.name for f in fields(Condition)} - {"extra"}
    return Condition(**{k: tensors.get(f"cond.{k}") for k in known},
                     extra={k: tensors[f"cond.{k}"] for k in cond.extra})


class GraphedCall:
    """A network call (:data:`accelkit.teacher.NetworkFn`) replayed from CUDA graphs, one per input signature.

    Outside inference (gradients enabled) or off CUDA it is the eager call. ``warmup`` eager calls on a side stream
    precede each capture (cuDNN / cuBLAS pick their kernels there, and a compiled network compiles there). All
    graphs share one memory pool: they are replayed one at a time and each output is copied out at once.
    """

    def __init__(self, call: Callable[..., Tensor], warmup: int = 2):
        self.call = call
        self.warmup = warmup
        self.graphs: dict[Any, tuple[torch.cuda.CUDAGraph, dict[str, Tensor], Tensor]] = {}
        self.pool: Any = None
        self.captures = 0
        self.replays = 0

    def __call__(self, network: nn.Module, x: Tensor, timestep: Tensor, cond: Condition | None) -> Tensor:
        if x.device.type != "cuda" or torch.is_grad_enabled():
            return self.call(network, x, timestep, cond)
        inputs = {"x": x, "timestep": timestep, **{f"cond.{k}": v for k, v in (cond.tensors() if cond else {}).items()}}
        key = (id(network), cond is None, tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in inputs.items()))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(network, inputs, cond)
        graph, static, out = entry
        for k, v in inputs.items():
            static[k].copy_(v)
        graph.replay()
        self.replays += 1
        return out.clone()

    def _capture(self, network: nn.Module, inputs: dict[str, Tensor], cond: Condition | None):
        with torch.inference_mode(False):  # plain buffers: filled in inference mode or under no_grad alike
            static = {k: v.clone() for k, v in inputs.items()}
        static_cond = _condition_like(cond, static)
        device = static["x"].device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.call(network, static["x"], static["timestep"], static_cond)
        torch.cuda.current_stream(device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.call(network, static["x"], static["timestep"], static_cond)
        self.captures += 1
        return graph, static, out


def accelerate(teacher: Teacher, *, compile: bool = False, cuda_graphs: bool = False, solver: str | None = None,
               what: str = "the teacher") -> Teacher:
    """Compile the networks of ``teacher`` and / or replay their calls from CUDA graphs (in place; returns it).

    One-line errors: nothing to act on (an analytic teacher has no network), CUDA graphs off CUDA, or with a
    parallel ``solver`` (its batch changes from round to round).
    """
    if not (compile or cuda_graphs):
        return teacher
    flag = " / ".join(name for name, on in (("--compile", compile), ("--cuda-graphs", cuda_graphs)) if on)
    nets = network_teachers(teacher)
    if not nets:
        raise AccelkitError(f"{flag}: {what} has no network to speed up (an analytic teacher); leave the flag off")
    if cuda_graphs:
        devices = {p.device.type for t in nets for p in t.network.parameters()}
        if devices != {"cuda"}:
            raise AccelkitError(f"--cuda-graphs: needs the network on a CUDA device (it is on "
                                f"{', '.join(sorted(devices)) or 'no device'}); pass --device cuda or leave it off")
        if solver is not None and ":" in solver:
            raise AccelkitError(f"--cuda-graphs: the parallel solver {solver} changes its batch every round; use a "
                                "fixed-grid solver (euler, dpm++2m, ...) or leave --cuda-graphs off")
    for t in nets:
        if compile and not getattr(t.network, "_accelkit_compiled", False):
            t.network.compile()
            t.network._accelkit_compiled = True
        if cuda_graphs and not isinstance(t.call, GraphedCall):
            t.call = GraphedCall(t.call)
    return teacher




@torch.no_grad()
def batch_to_fill_memory(teacher: Teacher, condition: Callable[[list[int]], Condition | None] | None, n: int,
                         device: torch.device | str, probe: int = 8, share: float = 0.8, most: int = 4096) -> int:
    """The sampling batch size that fills about ``share`` of the CUDA device's free memory, estimated from one
    (guided) teacher evaluation of ``probe`` samples: batch = share x free memory / (peak memory of the probe per
    sample), at most ``n`` and ``most``, a multiple of 8 when above 8. Samples do not depend on the batch size (sample
    i's noise comes from (seed, i)), so this only changes the speed."""
    device = torch.device(device)
    if device.type != "cuda":
        raise AccelkitError(f"batch_to_fill_memory: needs a CUDA device, not {device}")
    k = max(1, min(probe, n))
    idx = list(range(k))
    cond = condition(idx) if condition is not None else None
    if cond is not None:
        cond = cond.map(lambda v: v.to(device))
    x = torch.randn(k, *teacher.sample_shape, device=device)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    teacher.denoise(x, torch.full((k,), 0.5, device=device), cond)
    torch.cuda.synchronize(device)
    per_sample = max(1, torch.cuda.max_memory_allocated(device) - before) / k
    free, _ = torch.cuda.mem_get_info(device)
    batch = int(share * free / per_sample)
    batch = max(1, min(batch, n, most))
    return batch - batch % 8 if batch > 8 else batch


__all__ = ["accelerate", "GraphedCall", "network_teachers", "batch_to_fill_memory"]
