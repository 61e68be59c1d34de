"""Quantized adaptive conditions (QAC): a learned code per data point that straightens the denoiser's trajectories.

Liang, Chen et al. 2024, "Learning Quantized Adaptive Conditions for Diffusion Models" (arXiv 2409.17487), sections
3.2-3.4 and Algorithm 1. The forward paths x_t = alpha(t) x0 + sigma(t) eps of different data points cross, so the
probability-flow ODE of the marginal curves; conditioning the denoiser on a code y of x0 separates the paths and the
conditional ODEs curve less, which is what few-step solvers need.

* **Encoder** E_phi: x0 -> y in R^D, a small network (:class:`MLPEncoder` for vectors, :class:`ConvEncoder` for
  images), sized as a share of the teacher's parameters (about 1 % by default, :func:`encoder_width_for_share`;
  the paper's is a quarter of the UNet's channels and half its blocks, < 0.8 M parameters).
* **Finite scalar quantization** (Mentzer et al. 2023, in the paper's variant), per channel

      f(y) = floor(L sigmoid(y))  in {0, ..., L - 1},

  with a straight-through estimator (:func:`fsq`). By default the rounding is passed straight through and the
  bounding sigmoid is differentiated, as in FSQ (Mentzer et al. 2023: bound, then round with the STE),
  y_q = s + sg(f(y) - s) with s = L sigmoid(y), so dy_q/dy = L sigmoid'(y); ``straight_through="identity"`` is
  Algorithm 1 step 7 as printed, y_q = y + sg(f(y) - y), dy_q/dy = I. The printed form lets y grow without bound
  (a constant-sign gradient keeps pushing a code channel that no longer changes: on digits |y| reached 10^3) and
  the code book contracted to a few codes (perplexity 5-10 of 256); the bounded form stops pushing a sample once
  it is well inside its level (perplexity about 60; docs/benchmarks.md, QAC on digits). On the 2-D mixture the
  printed form did better at 4-6 NFE, so a run's ``quantizer`` (:func:`resolve_quantizer`) picks per data kind.
  L = 2 (binary codes) is the paper's choice; the codebook has L^D codes,
  code index sum_j digit_j L^(D-1-j) (:func:`code_index`, :func:`code_digits`).
* **Denoiser** D_theta(x_t, t, y_q): the teacher's network with the code added to its time embedding through two
  MLP layers, the last one zero-initialised (the shared extra-input mechanism, :mod:`accelkit.extra_inputs`), so
  at step 0 it equals the teacher for every code.
* **Training** (Algorithm 1): encoder and denoiser jointly on the teacher's own objective
  (:class:`accelkit.objectives.DenoisingObjective`: eps, x0, v or flow under its schedule), both averaged by the
  model EMA theta^- <- mu theta^- + (1 - mu) theta (step 11), and the code sampling weights collected online by
  the same EMA of each batch's code frequencies (steps 12-13)

      w <- mu w + (1 - mu) w_batch,   w_batch[c] = #{i in batch : Index(y_q,i) = c} / B,   w_0 = 0,

  (:class:`CodeWeights`; normalised to a probability vector when read). The paper's alternative, *offline*
  collection, counts the EMA encoder's codes over the data after training (:func:`collect_offline`); its Table 2
  finds online collection better (the EMA encoder and the EMA denoiser agree with the EMA of the codes the training
  saw, not with the codes the final encoder gives).
* **Sampling**: draw a code index from w (sample i from a generator of (seed, i), :func:`draw_code_indices`), then
  solve the conditional ODE with any solver.

The weights are stored sparsely: only codes that were seen, sorted by index (int64) with their float64 weight, so a
2^20 codebook costs what its used codes cost. A weight that falls below :data:`PRUNE_BELOW` of the total is dropped
(it would be drawn about once in 10^12 samples).
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import Tensor, nn

from .errors import AccelkitError

#: The largest codebook a code index can address (int64 indices, with room for their arithmetic).
MAX_CODEBOOK = 2**62
#: Stored weights below this share of the total are dropped.
PRUNE_BELOW = 1e-12
#: The name of the denoiser's extra input that carries the code (``cond.extra["code"]``).
CODE_INPUT = "code"
#: The key of a QAC model's code book in its teacher info.
INFO_KEY = "qac"


# ------------------------------------------------------------------------------------------------------- codebook


def codebook_size(levels: int, bits: int) -> int:
    """L^D, checked: L >= 2, D >= 1 and L^D addressable by an int64 index (<= 2^62)."""
    if levels < 2:
        raise AccelkitError(f"--levels {levels}: expected at least 2 quantization levels per channel (L = 2: binary "
                            "codes, the paper's choice)")
    if bits < 1:
        raise AccelkitError(f"--bits {bits}: expected at least 1 code channel")
    size = levels**bits
    if size > MAX_CODEBOOK:
        raise AccelkitError(f"--bits {bits} with --levels {levels}: a codebook of {levels}^{bits} codes, more than "
                            f"the 2^62 an int64 code index addresses; use at most "
                            f"{int(math.log(MAX_CODEBOOK) / math.log(levels))} channels")
    return size


def fsq_digits(y: Tensor, levels: int) -> Tensor:
    """f(y) = floor(L sigmoid(y)) per channel, in {0, ..., L - 1} (sigmoid(y) rounds to 1 for large y: clamped)."""
    return torch.floor(levels * torch.sigmoid(y)).clamp(max=levels - 1)


#: The straight-through estimators of :func:`fsq`: "bounded" (FSQ's: through the rounding only) or "identity"
#: (Algorithm 1 step 7 as printed: through the whole of f).
STRAIGHT_THROUGH = ("bounded", "identity")


def fsq(y: Tensor, levels: int, straight_through: str = "bounded") -> Tensor:
    """The value f(y) = floor(L sigmoid(y)) with a straight-through gradient.

    ``bounded`` (FSQ, Mentzer et al. 2023): y_q = s + sg(f(y) - s) with s = L sigmoid(y); the rounding is passed
    straight through (dy_q/ds = I) and the bound differentiated, dy_q/dy = L sigmoid'(y).
    ``identity`` (Algorithm 1 step 7 as printed): y_q = y + sg(f(y) - y), dy_q/dy = I.

    Written f(y) + (u - sg(u)) (u = s or y), the same function and gradient, so that the value is f(y) exactly
    (u + (f - u) rounds in float32)."""
    if straight_through == "identity":
        u = y
    elif straight_through == "bounded":
        u = levels * torch.sigmoid(y)
    else:
        raise ValueError(f"straight_through {straight_through!r}: expected one of {STRAIGHT_THROUGH}")
    return fsq_digits(y, levels).detach() + (u - u.detach())


def code_index(digits: Tensor, levels: int) -> Tensor:
    """The index sum_j d_j L^(D-1-j) of codes with digits d (..., D) in {0..L-1}; int64 of shape (...)."""
    d = digits.detach().round().long()
    bits = d.shape[-1]
    place = levels ** torch.arange(bits - 1, -1, -1, dtype=torch.int64, device=d.device)
    return (d * place).sum(-1)


def code_digits(index: Tensor, levels: int, bits: int) -> Tensor:
    """The inverse of :func:`code_index`: digits (..., D) as float32 (the values the denoiser takes)."""
    index = torch.as_tensor(index, dtype=torch.int64)
    place = levels ** torch.arange(bits - 1, -1, -1, dtype=torch.int64, device=index.device)
    return ((index[..., None] // place) % levels).float()


# -------------------------------------------------------------------------------------------------------- encoders


class MLPEncoder(nn.Module):
    """E_phi for vectors: x0 -> Linear(W) -> SiLU -> Linear(W) -> SiLU -> Linear(D)."""

    def __init__(self, dim: int, bits: int, width: int):
        super().__init__()
        self.config = {"kind": "mlp", "dim": dim, "bits": bits, "width": width}
        self.net = nn.Sequential(nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, bits))

    def forward(self, x0: Tensor) -> Tensor:
        return self.net(x0.reshape(x0.shape[0], -1))


class ConvEncoder(nn.Module):
    """E_phi for images: 3x3 convolutions W -> 2W (stride 2) -> 2W (stride 2) with SiLU, global average pool, a
    linear map to D (the down half of a small UNet at a fraction of its channels, as the paper's encoder)."""

    def __init__(self, channels: int, bits: int, width: int):
        super().__init__()
        self.config = {"kind": "conv", "channels": channels, "bits": bits, "width": width}
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, bits))

    def forward(self, x0: Tensor) -> Tensor:
        return self.net(x0)


def build_encoder(sample_shape: tuple[int, ...], bits: int, width: int) -> nn.Module:
    """An MLP encoder for vectors (and any non-image shape, flattened), a conv encoder for C x H x W images."""
    if width < 1:
        raise AccelkitError(f"--encoder-width {width}: expected a positive width")
    if len(sample_shape) == 3:
        return ConvEncoder(sample_shape[0], bits, width)
    return MLPEncoder(math.prod(sample_shape), bits, width)


#: The quantizer settings of a QAC run: "fsq" (FSQ's bounded straight-through estimator, the encoder's outputs
#: initialised at unit scale) or "paper" (Algorithm 1 as printed, the outputs only centred); "auto" picks "fsq" for
#: images (the conv encoder) and "paper" for vectors (the MLP encoder), as measured in docs/benchmarks.md.
QUANTIZERS = {"fsq": ("bounded", True), "paper": ("identity", False)}


def resolve_quantizer(quantizer: str, sample_shape: tuple[int, ...]) -> str:
    """``quantizer`` with "auto" resolved: "fsq" for C x H x W samples, "paper" for the rest."""
    if quantizer == "auto":
        return "fsq" if len(sample_shape) == 3 else "paper"
    if quantizer not in QUANTIZERS:
        raise AccelkitError(f"quantizer {quantizer!r}: expected auto, {', '.join(QUANTIZERS)}")
    return quantizer


@torch.no_grad()
def center_encoder(encoder: nn.Module, x0: Tensor, scale: bool = True) -> None:
    """Data-dependent initialisation of the encoder's output layer (Salimans & Kingma 2016's weight-norm
    initialisation): scale each output channel to unit standard deviation over ``x0`` (unless ``scale`` is False)
    and subtract its median, so that every channel starts split in half by f's middle threshold, on the scale of the
    sigmoid's slope.

    Without the shift a freshly initialised encoder can map all data to one code (its outputs vary little around a
    common offset: seen on digits, one code of 256 after 300 steps). Without the scale the outputs vary over the
    data by about 0.003 (a small conv net's global average pool), a thousandth of Adam's step on the output bias
    over a few hundred steps, so the codes are set by the drift of the bias, not by the data."""
    last = encoder.net[-1]
    y = encoder(x0).float()
    if scale:
        std = y.std(dim=0).clamp_min(1e-12).to(last.weight.dtype)
        last.weight.div_(std[:, None])
        last.bias.div_(std)
        y = encoder(x0).float()
    last.bias.sub_(y.median(dim=0).values.to(last.bias.dtype))


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def encoder_width_for_share(sample_shape: tuple[int, ...], bits: int, teacher_parameters: int,
                            share: float = 0.01) -> int:
    """The largest width (at least 4) whose encoder has at most ``share`` of the teacher's parameters."""
    width = 4
    while parameter_count(build_encoder(sample_shape, bits, width + 4)) <= share * teacher_parameters:
        width += 4
    return width


# --------------------------------------------------------------------------------------------------- code weights


class CodeWeights(nn.Module):
    """The code sampling weights w of Algorithm 1 (steps 3, 12, 13), stored sparsely.

    ``codes`` holds the indices seen (sorted int64), ``weights`` their float64 w. :meth:`update` applies
    w <- d w + (1 - d) w_batch with the batch's code frequencies w_batch; :meth:`probabilities` gives w / sum(w).
    The state travels in the module's state dict as one int64 tensor (``_extra_state``: row 0 the codes, row 1 the
    weights' float64 bits), so a training checkpoint restores it exactly and its size is that of the used codes.
    """

    def __init__(self, levels: int, bits: int):
        super().__init__()
        self.levels, self.bits = int(levels), int(bits)
        self.size = codebook_size(self.levels, self.bits)
        self.codes = torch.zeros(0, dtype=torch.int64)
        self.weights = torch.zeros(0, dtype=torch.float64)
        self.updates = 0

    def __len__(self) -> int:
        return int(self.codes.numel())

    @torch.no_grad()
    def update(self, indices: Tensor, decay: float) -> None:
        """One EMA step on a batch's code indices (1-D int64): w <- decay w + (1 - decay) counts / len(indices)."""
        indices = indices.detach().reshape(-1).to("cpu", torch.int64)
        if indices.numel() == 0:
            raise ValueError("a batch without codes")
        seen, counts = torch.unique(indices, return_counts=True)  # sorted
        codes = torch.cat([self.codes, seen])
        values = torch.cat([self.weights * decay, (1.0 - decay) * counts.double() / indices.numel()])
        merged, inverse = torch.unique(codes, return_inverse=True)
        weights = torch.zeros(len(merged), dtype=torch.float64).index_add_(0, inverse, values)
        keep = weights > PRUNE_BELOW * weights.sum()
        self.codes, self.weights = merged[keep].contiguous(), weights[keep].contiguous()
        self.updates += 1

    def set_counts(self, indices: Tensor) -> None:
        """Replace w by the code frequencies of ``indices`` (offline collection)."""
        seen, counts = torch.unique(indices.detach().reshape(-1).to("cpu", torch.int64), return_counts=True)
        self.codes, self.weights = seen.contiguous(), counts.double() / counts.sum()
        self.updates = 1

    def probabilities(self) -> tuple[Tensor, Tensor]:
        """(codes, p): the used code indices and w normalised to sum 1."""
        if not len(self):
            raise AccelkitError("the code sampling weights are empty: no training step collected any code")
        return self.codes, self.weights / self.weights.sum()

    def perplexity(self) -> float:
        """exp(entropy of p): the number of equally likely codes with the same entropy (codebook use)."""
        _, p = self.probabilities()
        return float(torch.exp(-(p * torch.log(p)).sum()))

    # state: one int64 tensor, exact
    def get_extra_state(self) -> Tensor:
        return torch.stack([self.codes, self.weights.view(torch.int64), ]) if len(self) else \
            torch.zeros(2, 0, dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        state = torch.as_tensor(state).to("cpu", torch.int64)
        self.codes = state[0].clone().contiguous()
        self.weights = state[1].clone().contiguous().view(torch.float64)

    # the QAC model's code book in its teacher file header (JSON: indices exact, float64 by repr)
    def to_info(self) -> dict[str, Any]:
        codes, p = self.probabilities()
        return {"levels": self.levels, "bits": self.bits, "codes": codes.tolist(), "weights": p.tolist()}

    @staticmethod
    def from_info(info: dict[str, Any]) -> CodeWeights:
        try:
            w = CodeWeights(int(info["levels"]), int(info["bits"]))
            w.codes = torch.tensor(info["codes"], dtype=torch.int64)
            w.weights = torch.tensor(info["weights"], dtype=torch.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise AccelkitError(f"unreadable QAC code book in the model header ({e})") from None
        if w.codes.shape != w.weights.shape or not len(w) or bool((w.codes < 0).any() | (w.codes >= w.size).any()):
            raise AccelkitError("the QAC code book in the model header is inconsistent (codes outside the codebook "
                                "or weights of another length)")
        return w


def collect_offline(encoder: nn.Module, data: Tensor, levels: int, bits: int, batch_size: int = 1024,
                    device: torch.device | str = "cpu") -> CodeWeights:
    """The paper's offline collection: the code frequencies of ``encoder`` (the EMA encoder) over ``data``."""
    indices = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            x0 = data[start:start + batch_size].to(device)
            indices.append(code_index(fsq_digits(encoder(x0).float(), levels), levels).cpu())
    weights = CodeWeights(levels, bits)
    weights.set_counts(torch.cat(indices))
    return weights


# ------------------------------------------------------------------------------------------------------- training


class QACModel(nn.Module):
    """The networks of one QAC run as one module, so that one optimizer, one EMA and one checkpoint hold them all:
    Algorithm 1 step 10 is one gradient step of one loss on (theta, phi) with one rate eta, so they are one parameter
    group of :class:`accelkit.training.Trainer` (its several-group form would run a forward and backward pass per
    group and step, and trains no LoRA adapters).

    ``denoiser``: the teacher's network with the ``code`` extra input; ``accelkit_extra["encoder"]``: E_phi (under
    that name so that LoRA training, :func:`accelkit.training.apply_lora`, keeps it trainable as it keeps every
    extra-input parameter); ``code_weights``: the online weights w. ``bits`` = 0 is the control: no encoder, no
    code, the teacher fine-tuned on the same objective.

    :meth:`forward` is Algorithm 1 steps 6-9 on a batch with the clean samples (``x`` or ``sample``), the noise
    ``eps`` and the time ``t``: y = E(x0), y_q = STE(f(y)), the objective's loss of D_theta(x_t, t, y_q). It keeps
    the batch's code indices in :attr:`last_codes` for steps 12-13 (:meth:`collect`).
    """

    def __init__(self, denoiser: nn.Module, encoder: nn.Module | None, objective: Any, levels: int, bits: int,
                 straight_through: str = "bounded"):
        super().__init__()
        self.straight_through = straight_through
        self.denoiser = denoiser
        self.accelkit_extra = nn.ModuleDict({"encoder": encoder}) if encoder is not None else None
        self.code_weights = CodeWeights(levels, bits) if encoder is not None else None
        self.objective, self.levels, self.bits = objective, int(levels), int(bits)
        self.last_codes: Tensor | None = None

    @property
    def encoder(self) -> nn.Module | None:
        return self.accelkit_extra["encoder"] if self.accelkit_extra is not None else None

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x0 = batch["sample"] if "sample" in batch else batch["x"]
        pairs = {"x": x0, "eps": batch["eps"], "t": batch["t"],
                 **{k: v for k, v in batch.items() if k.startswith("cond.")}}
        if self.encoder is not None:
            y_q = fsq(self.encoder(x0).float(), self.levels, self.straight_through)
            pairs["cond." + CODE_INPUT] = y_q
            self.last_codes = code_index(y_q, self.levels)
        return self.objective.loss(self.denoiser, pairs)

    @torch.no_grad()
    def collect(self, codes: Tensor, decay: float) -> None:
        """Algorithm 1 steps 12-13: w <- decay w + (1 - decay) (code frequencies of the global batch)."""
        assert self.code_weights is not None
        self.code_weights.update(codes, decay)


# ------------------------------------------------------------------------------------------------------- sampling


def code_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index``'s code draw: a stream apart from its noise's (seed, index)."""
    from .noise import sample_seed, splitmix64

    return splitmix64(sample_seed(seed, index) ^ 0x51AC0DE) >> 1


def draw_code_indices(weights: CodeWeights, seed: int, indices: list[int]) -> Tensor:
    """Code index of each sample i in ``indices``, drawn from p = w / sum(w) by a generator of (seed, i) alone."""
    codes, p = weights.probabilities()
    cdf = torch.cumsum(p, 0)
    g = torch.Generator()
    u = torch.empty(len(indices), dtype=torch.float64)
    for row, i in enumerate(indices):
        g.manual_seed(code_seed(seed, int(i)))
        u[row] = torch.rand((), generator=g, dtype=torch.float64)
    pick = torch.searchsorted(cdf, u * cdf[-1], right=True).clamp(max=len(codes) - 1)
    return codes[pick]


def code_book_of(teacher: Any) -> CodeWeights | None:
    """A QAC model's code book (from its info), or None for any other teacher."""
    info = getattr(teacher, "info", None) or {}
    entry = info.get(INFO_KEY)
    if not entry:
        return None
    cached = _CODE_BOOKS.get(id(entry))
    if cached is None or cached[0] is not entry:
        cached = (entry, CodeWeights.from_info(json.loads(entry) if isinstance(entry, str) else entry))
        _CODE_BOOKS[id(entry)] = cached
    return cached[1]


_CODE_BOOKS: dict[int, tuple[Any, CodeWeights]] = {}  # parsed code books by the identity of their info entry


def check_code(code: int, weights: CodeWeights) -> None:
    if not 0 <= code < weights.size:
        raise AccelkitError(f"--code {code}: expected a code index in 0..{weights.size - 1} (codebook of "
                            f"{weights.levels}^{weights.bits})")


def with_codes(teacher: Any, cond: Any, seed: int, indices: Any, code: int | None = None) -> Any:
    """``cond`` of the samples ``indices`` with ``cond.extra["code"]`` added when ``teacher`` is a QAC model: the
    digits of ``code`` for every sample, or (unless ``cond`` already carries codes) of a code drawn for each
    (seed, i); other teachers get ``cond`` as is (and a ``code`` is refused)."""
    from .teacher import Condition

    weights = code_book_of(teacher)
    if weights is None:
        if code is not None:
            raise AccelkitError("--code: the model is not a QAC model (accelkit qac); it takes no code")
        return cond
    if code is None and cond is not None and CODE_INPUT in cond.extra:
        return cond  # codes given with the condition (e.g. couplings of a QAC model) stay
    indices = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
    if code is not None:
        check_code(code, weights)
        idx = torch.full((len(indices),), code, dtype=torch.int64)
    else:
        idx = draw_code_indices(weights, seed, indices)
    digits = code_digits(idx, weights.levels, weights.bits)
    if cond is None:
        return Condition(extra={CODE_INPUT: digits})
    digits = digits.to(next(iter(cond.tensors().values())).device) if cond.tensors() else digits
    return Condition(cond.class_labels, cond.encoder_hidden_states, cond.encoder_attention_mask,
                     cond.pooled_projections, {**cond.extra, CODE_INPUT: digits})


def code_condition(teacher: Any, seed: int, code: int | None = None):
    """``wrap(condition_fn) -> condition_fn`` (a :data:`accelkit.sampling.ConditionFn`, or None) whose condition of
    samples i carries their code (:func:`with_codes`); for a teacher that is not a QAC model, the identity."""
    if code_book_of(teacher) is None:
        with_codes(teacher, None, seed, [], code)  # refuses a --code
        return lambda fn: fn
    if code is not None:
        check_code(code, code_book_of(teacher))

    def wrap(fn):
        def condition(indices: list[int]):
            return with_codes(teacher, fn(indices) if fn is not None else None, seed, indices, code)

        return condition

    return wrap


__all__ = ["QACModel", "fsq", "fsq_digits", "code_index", "code_digits", "codebook_size", "MLPEncoder", "ConvEncoder",
           "build_encoder", "center_encoder", "encoder_width_for_share", "parameter_count", "CodeWeights",
           "collect_offline", "STRAIGHT_THROUGH", "QUANTIZERS", "resolve_quantizer",
           "draw_code_indices", "code_book_of", "code_condition", "with_codes", "check_code", "CODE_INPUT", "INFO_KEY",
           "PRUNE_BELOW"]
