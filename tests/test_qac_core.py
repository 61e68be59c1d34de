"""accelkit.qac: finite scalar quantization with the straight-through estimator, code index <-> digits, the sparse
online code weights (an EMA of batch code frequencies: a probability vector that converges to the data's code
frequencies, restored exactly from a state dict), the per-sample seeded code draw."""

import math

import pytest
import torch

from accelkit.errors import AccelkitError
from accelkit.qac import (
    PRUNE_BELOW,
    CodeWeights,
    build_encoder,
    code_digits,
    code_index,
    codebook_size,
    collect_offline,
    draw_code_indices,
    encoder_width_for_share,
    fsq,
    fsq_digits,
    parameter_count,
)
from accelkit.training import EMA


@pytest.mark.parametrize("levels", [2, 3, 5])
@pytest.mark.parametrize("straight_through", ["bounded", "identity"])
def test_fsq_values_are_the_levels_and_the_gradient_is_the_identitys(levels, straight_through):
    y = torch.linspace(-40, 40, 4001).reshape(-1, 1).repeat(1, 3).requires_grad_(True)
    q = fsq(y, levels, straight_through)
    assert set(q.detach().unique().tolist()) == set(range(levels))  # every level, nothing else (also at +-40)
    expected = torch.floor(levels * torch.sigmoid(y.detach())).clamp(max=levels - 1)
    assert torch.equal(q.detach(), expected)
    w = torch.randn_like(y)
    (q * w).sum().backward()
    if straight_through == "identity":
        assert torch.equal(y.grad, w)  # Algorithm 1 as printed: d y_q / d y = I
    else:  # FSQ: the rounding is the identity's, the bound L sigmoid(y) is differentiated
        s = torch.sigmoid(y.detach())
        torch.testing.assert_close(y.grad, w * levels * s * (1 - s), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="straight_through"):
        fsq(y, levels, "floor")


def test_center_encoder_balances_every_channel_at_unit_scale():
    """The data-dependent init: each output channel has median 0 (half the data on each side of f's middle threshold)
    and standard deviation 1 over the data (a fresh conv encoder's outputs vary by ~0.003 across digits)."""
    from accelkit.data import digits
    from accelkit.qac import center_encoder

    x = digits()[:1024]
    torch.manual_seed(0)
    encoder = build_encoder((1, 8, 8), 8, 4)
    with torch.no_grad():
        assert float(encoder(x).std(0).max()) < 0.05  # the scale the init corrects
    center_encoder(encoder, x)
    with torch.no_grad():
        y = encoder(x)
    torch.testing.assert_close(y.std(0), torch.ones(8), atol=1e-4, rtol=0)
    assert float(y.median(0).values.abs().max()) < 1e-4
    ones = fsq_digits(y, 2).mean(0)
    assert bool(((ones - 0.5).abs() <= 1.5 / len(x)).all()), ones
    # quantizer auto: FSQ (bounded STE, unit scale) for images, Algorithm 1 as printed for vectors
    from accelkit.qac import QUANTIZERS, resolve_quantizer

    assert resolve_quantizer("auto", (1, 8, 8)) == "fsq" and resolve_quantizer("auto", (2,)) == "paper"
    assert QUANTIZERS["fsq"] == ("bounded", True) and QUANTIZERS["paper"] == ("identity", False)
    with pytest.raises(AccelkitError, match="quantizer 'x'"):
        resolve_quantizer("x", (2,))


def test_fsq_thresholds_are_the_sigmoid_quantiles():
    # f(y) = k exactly on sigmoid(y) in [k / L, (k + 1) / L): with L = 4 the thresholds are logit(1/4), 0, logit(3/4)
    L = 4
    th = [math.log(k / (L - k)) for k in (1, 2, 3)]
    y = torch.tensor([[th[0] - 1e-4, th[0] + 1e-4, -1e-6, 1e-6, th[2] - 1e-4, th[2] + 1e-4]])
    assert fsq_digits(y, L).tolist() == [[0, 1, 1, 2, 2, 3]]


@pytest.mark.parametrize("levels,bits", [(2, 1), (2, 20), (3, 7), (7, 3), (2, 62)])
def test_code_index_digits_round_trip(levels, bits):
    size = codebook_size(levels, bits)
    g = torch.Generator().manual_seed(0)
    idx = torch.cat([torch.tensor([0, size - 1]), torch.randint(0, min(size, 2**62), (500,), generator=g)])
    digits = code_digits(idx, levels, bits)
    assert digits.shape == (502, bits) and digits.min() >= 0 and digits.max() <= levels - 1
    assert torch.equal(code_index(digits, levels), idx)
    if size <= 4096:  # every code once: a bijection
        every = torch.arange(size)
        assert torch.equal(code_index(code_digits(every, levels, bits), levels), every)


def test_codebook_size_refuses_one_level_and_unaddressable_codebooks():
    with pytest.raises(AccelkitError, match="--levels 1"):
        codebook_size(1, 8)
    with pytest.raises(AccelkitError, match="--bits 63"):
        codebook_size(2, 63)
    with pytest.raises(AccelkitError, match="--bits 0"):
        codebook_size(2, 0)
    assert codebook_size(2, 62) == 2**62


def test_encoder_shapes_and_size_share():
    for shape, kind in (((2,), "mlp"), ((1, 8, 8), "conv"), ((3, 28, 28), "conv")):
        enc = build_encoder(shape, 6, 16)
        assert enc.config["kind"] == kind
        assert enc(torch.randn(5, *shape)).shape == (5, 6)
    teacher_params = 600_000
    w = encoder_width_for_share((1, 8, 8), 16, teacher_params, 0.01)
    assert parameter_count(build_encoder((1, 8, 8), 16, w)) <= 0.01 * teacher_params
    assert parameter_count(build_encoder((1, 8, 8), 16, w + 4)) > 0.01 * teacher_params


def test_online_weights_are_an_ema_of_batch_frequencies_and_a_probability_vector():
    """Against a dense reference of Algorithm 1 steps 12-13 with the model EMA's decays (warm-up included)."""
    levels, bits = 2, 4
    g = torch.Generator().manual_seed(1)
    ema = EMA(torch.nn.Linear(1, 1), [0.99], warmup=True)
    w = CodeWeights(levels, bits)
    dense = torch.zeros(16, dtype=torch.float64)
    for k in range(1, 301):
        batch = torch.randint(0, 16, (64,), generator=g) // torch.randint(1, 4, (64,), generator=g)
        d = ema.decay(0.99, k)
        w.update(batch, d)
        dense = d * dense + (1 - d) * torch.bincount(batch, minlength=16).double() / 64
    codes, p = w.probabilities()
    assert torch.all(codes[1:] > codes[:-1]) and torch.all(p > 0)
    assert abs(float(p.sum()) - 1.0) < 1e-12
    full = torch.zeros(16, dtype=torch.float64)
    full[codes] = p
    assert torch.allclose(full, dense / dense.sum(), rtol=0, atol=1e-14)
    assert len(w) == int((dense > 0).sum())  # sparse: only the codes seen


def test_online_weights_converge_to_the_code_frequencies_of_the_data():
    """A fixed encoder over a data set: the EMA (rate 0.999, batch 256) ends within total variation 0.03 of the
    data's code frequencies (observed 0.002; the EMA's noise is O(sqrt((1 - mu) / B)) per code)."""
    torch.manual_seed(0)
    levels, bits = 2, 3
    data = torch.randn(20_000, 2) * torch.tensor([2.0, 0.5]) + torch.tensor([0.3, -0.2])
    encoder = build_encoder((2,), bits, 8)
    with torch.no_grad():
        encoder.net[-1].bias.zero_()  # codes split around the data's centre rather than all on one side
    truth = collect_offline(encoder, data, levels, bits)
    ema = EMA(torch.nn.Linear(1, 1), [0.999], warmup=True)
    w = CodeWeights(levels, bits)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for k in range(1, 3001):
            x = data[torch.randint(0, len(data), (256,), generator=g)]
            w.update(code_index(fsq_digits(encoder(x), levels), levels), ema.decay(0.999, k))
    size = 2**bits
    p_online, p_true = torch.zeros(size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
    p_online[w.probabilities()[0]] = w.probabilities()[1]
    p_true[truth.probabilities()[0]] = truth.probabilities()[1]
    tv = 0.5 * float((p_online - p_true).abs().sum())
    assert tv < 0.03, tv
    assert truth.perplexity() > 2  # the test is not trivial: several codes in use


def test_weights_state_restores_exactly_and_costs_what_the_used_codes_cost():
    w = CodeWeights(2, 20)  # a 2^20 codebook
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        w.update(torch.randint(0, 2**20, (32,), generator=g), 0.9)
    state = w.state_dict()
    assert list(state) == ["_extra_state"] and state["_extra_state"].shape == (2, len(w)) and len(w) <= 50 * 32
    other = CodeWeights(2, 20)
    other.load_state_dict(state)
    assert torch.equal(other.codes, w.codes) and torch.equal(other.weights, w.weights)  # bit for bit (float64)
    huge = CodeWeights(2, 48)  # 2^48 codes: no dense vector could hold them, the sparse store holds the used ones
    huge.update(torch.randint(0, 2**48, (64,), generator=g), 0.5)
    assert huge.state_dict()["_extra_state"].shape == (2, len(huge)) and len(huge) <= 64
    empty = CodeWeights(2, 20)
    assert empty.state_dict()["_extra_state"].shape == (2, 0)
    # the header form: exact too (float64 through JSON's repr)
    back = CodeWeights.from_info(w.to_info())
    assert torch.equal(back.codes, w.codes) and torch.equal(back.weights, w.probabilities()[1])


def test_weights_prune_codes_whose_share_vanishes():
    w = CodeWeights(2, 8)
    w.update(torch.tensor([7]), 0.0)
    for _ in range(200):  # 0.5^200 << 1e-12
        w.update(torch.tensor([3]), 0.5)
    assert w.codes.tolist() == [3]
    assert PRUNE_BELOW < 1e-9


def test_code_draw_is_per_sample_seeded_and_follows_the_weights():
    w = CodeWeights(2, 3)
    w.set_counts(torch.tensor([1] * 70 + [5] * 20 + [6] * 10))
    a = draw_code_indices(w, 7, list(range(20_000)))
    b = torch.cat([draw_code_indices(w, 7, list(range(s, s + 333))) for s in range(0, 20_000, 333)])
    assert torch.equal(a, b[:20_000])  # batch-size invariant: sample i's code depends on (seed, i) alone
    assert set(a.unique().tolist()) == {1, 5, 6}
    freq = torch.tensor([(a == c).double().mean() for c in (1, 5, 6)])
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), atol=0.015)
    assert not torch.equal(a, draw_code_indices(w, 8, list(range(20_000))))
