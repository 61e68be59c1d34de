"""GPU speed (issue 16, item 6) as far as the CPU shows it: --compile gives the eager samples, --cuda-graphs is refused
off CUDA, a half-precision network keeps the solver's state and schedule arithmetic in float32. The graphed runs
themselves are in the cuda-marked tests at the end (skipped without CUDA)."""

import pytest
import torch
from conftest import run_in_process
from safetensors.torch import load_file

from accelkit.acceleration import GraphedCall, accelerate
from accelkit.errors import AccelkitError
from accelkit.models.analytic import gaussian_mixture_images
from accelkit.models.builtin import MLP, builtin_call
from accelkit.models.loading import load_teacher, save_teacher
from accelkit.schedules import DiscreteVPSchedule, LinearSchedule
from accelkit.teacher import NetworkTeacher, Teacher


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    torch.manual_seed(0)
    teacher = NetworkTeacher(MLP(dim=2, hidden=16, depth=2), builtin_call, "flow", LinearSchedule(), (2,))
    return save_teacher(teacher, tmp_path_factory.mktemp("accel") / "mlp.safetensors")


@pytest.mark.parametrize("command", ["sample", "couple"])
def test_cuda_graphs_on_the_cpu_is_a_one_line_error(mlp_file, tmp_path, monkeypatch, capsys, command):
    out = tmp_path / ("x.safetensors" if command == "sample" else "pairs")
    args = [command, mlp_file, "--cuda-graphs", "--device", "cpu", "-o", out, *(["-n", "4"] if command == "couple"
                                                                                 else [])]
    code, stdout, err = run_in_process(monkeypatch, capsys, *args)
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1 and "cuda" in err.lower(), err
    assert not out.exists()


def test_cuda_graphs_refuse_parallel_solvers_and_analytic_teachers(mlp_file):
    analytic = gaussian_mixture_images(DiscreteVPSchedule("linear"), shape=(1, 4, 4), modes=3)
    with pytest.raises(AccelkitError, match="no network"):
        accelerate(analytic, compile=True)
    teacher = load_teacher(mlp_file)
    with pytest.raises(AccelkitError, match="CUDA device"):
        accelerate(teacher, cuda_graphs=True)
    from accelkit.stages.couple import CoupleRecipe

    with pytest.raises(ValueError, match="parallel solver"):
        CoupleRecipe(teacher=str(mlp_file), n=4, solver="picard:euler", device="cuda", cuda_graphs=True)


def test_graphed_call_is_the_eager_call_off_cuda_and_with_gradients():
    calls = []

    def call(network, x, ts, cond):
        calls.append(x.shape)
        return network(x, ts)

    net = MLP(dim=2, hidden=8, depth=1)
    graphed = GraphedCall(call)
    x, ts = torch.randn(3, 2), torch.rand(3)
    assert torch.equal(graphed(net, x, ts, None), net(x, ts)) and graphed.captures == 0 and len(calls) == 1


@pytest.mark.slow  # the first torch.compile of a process takes 20-90 s on a 2-core CPU (inductor + gcc)
def test_compiled_samples_equal_eager_on_the_cpu(mlp_file, tmp_path, monkeypatch, capsys):
    out = {}
    for name, flags in (("eager", ()), ("compiled", ("--compile",))):
        path = tmp_path / f"{name}.safetensors"
        code, _, err = run_in_process(monkeypatch, capsys, "sample", mlp_file, "--solver", "dpm++2m", "--nfe", "6",
                                      "-n", "32", "--batch-size", "32", "-o", path, *flags)
        assert code == 0, err
        out[name] = load_file(path)["samples"]
    teacher = load_teacher(mlp_file)
    accelerate(teacher, compile=True)
    assert getattr(teacher.network, "_compiled_call_impl", None) is not None  # compiled in place, same keys
    assert list(teacher.network.state_dict()) == list(load_teacher(mlp_file).network.state_dict())
    assert not torch.equal(out["compiled"], torch.zeros_like(out["compiled"]))
    assert (out["compiled"] - out["eager"]).abs().max() < 1e-5


class DtypeRecorder(Teacher):
    """Delegates to ``base``; records the dtype of every state the solver evaluates the teacher at."""

    def __init__(self, base):
        super().__init__()
        self.base, self.schedule, self.sample_shape, self.seen = base, base.schedule, base.sample_shape, set()

    def denoise(self, x, t, cond=None):
        self.seen.add(x.dtype)
        return self.base.denoise(x, t, cond)

    def prior_sample(self, noise):
        return self.base.prior_sample(noise)

    def describe(self):
        return self.base.describe()


def test_bf16_network_keeps_the_solver_state_in_float32(mlp_file, tmp_path):
    """The network runs in bfloat16 (its inputs are cast to it), the solver's state and every schedule coefficient
    stay float32, and the couplings land within bf16's precision of the float32 run's."""
    from accelkit.couplings import open_couplings
    from accelkit.stages.couple import CoupleRecipe, run_couple

    teacher = load_teacher(mlp_file, dtype="bf16")
    assert {p.dtype for p in teacher.network.parameters()} == {torch.bfloat16}
    net_inputs = []
    teacher.network.register_forward_pre_hook(lambda m, args: net_inputs.append(args[0].dtype))
    recorder = DtypeRecorder(teacher)
    common = dict(teacher=str(mlp_file), n=64, solver="dpm++2m", nfe=6, micro_batch=32, shard_size=64)
    half = open_couplings(run_couple(CoupleRecipe(**common, dtype="bf16"), tmp_path / "bf16", teacher=recorder))[0:64]
    full = open_couplings(run_couple(CoupleRecipe(**common), tmp_path / "fp32"))[0:64]
    assert recorder.seen == {torch.float32} and set(net_inputs) == {torch.bfloat16}
    assert half["sample"].dtype == torch.float32
    assert 0 < rel(half["sample"], full["sample"]) < 3e-2


# ------------------------------------------------------------------------------------------------------- on CUDA


@pytest.fixture(scope="module")
def sd_like(tmp_path_factory):
    from tiny_models import sd_like_pipeline

    return sd_like_pipeline(tmp_path_factory.mktemp("sd") / "sd")


@pytest.mark.cuda
@pytest.mark.parametrize("solver", ["euler", "dpm++2m", "unipc"])
def test_cuda_graphed_samples_equal_eager(sd_like, solver):
    """A guided text-conditioned UNet: one graph per batch shape, replayed at every step, the eager samples."""
    from accelkit.noise import sample_noise
    from accelkit.solvers import solve
    from accelkit.teacher import Condition

    teacher = load_teacher(sd_like, device="cuda", dtype="fp32", guidance=5.0)
    ehs = torch.randn(8, 5, 12, generator=torch.Generator().manual_seed(2)).cuda()
    cond = Condition(encoder_hidden_states=ehs)
    x1 = teacher.prior_sample(sample_noise(0, range(8), teacher.sample_shape, device="cuda"))
    eager = solve(teacher, x1, solver=solver, nfe=8, cond=cond)
    accelerate(teacher, cuda_graphs=True, solver=solver)
    graphed = solve(teacher, x1, solver=solver, nfe=8, cond=cond)
    again = solve(teacher, x1, solver=solver, nfe=8, cond=cond)
    call = teacher.call
    assert isinstance(call, GraphedCall) and call.captures == 1 and call.replays == 16
    assert torch.equal(graphed, again) and rel(graphed, eager) < 1e-6


@pytest.mark.cuda
def test_cuda_graphed_step_loop_has_no_host_sync(sd_like):
    from accelkit.solvers import solve
    from accelkit.teacher import Condition

    teacher = accelerate(load_teacher(sd_like, device="cuda", dtype="fp32", guidance=4.0), cuda_graphs=True)
    x = torch.randn(4, 3, 8, 8, device="cuda")
    cond = Condition(encoder_hidden_states=torch.randn(4, 5, 12, device="cuda"))
    solve(teacher, x, solver="dpm++2m", nfe=6, cond=cond)  # captures
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        solve(teacher, x, solver="dpm++2m", nfe=6, cond=cond)  # guided: conditional and null rows, one replay
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_couple_with_cuda_graphs_and_compile_equals_eager(mlp_file, tmp_path):
    from accelkit.couplings import open_couplings
    from accelkit.stages.couple import CoupleRecipe, run_couple

    common = dict(teacher=str(mlp_file), n=128, solver="dpm++2m", nfe=8, micro_batch=64, device="cuda")
    eager = open_couplings(run_couple(CoupleRecipe(**common), tmp_path / "eager"))[0:128]
    graphed = open_couplings(run_couple(CoupleRecipe(**common, cuda_graphs=True), tmp_path / "graphed"))[0:128]
    both = open_couplings(run_couple(CoupleRecipe(**common, cuda_graphs=True, compile=True),
                                     tmp_path / "both"))[0:128]
    assert torch.equal(eager["noise"], graphed["noise"])
    assert rel(graphed["sample"], eager["sample"]) < 1e-6 and rel(both["sample"], eager["sample"]) < 1e-5


def test_sample_keeps_batch_64_on_the_cpu_when_not_given(mlp_file, tmp_path, monkeypatch, capsys):
    import json

    from safetensors import safe_open

    out = tmp_path / "x.safetensors"
    code, _, err = run_in_process(monkeypatch, capsys, "sample", mlp_file, "--nfe", "2", "-n", "4", "-o", out)
    assert code == 0, err
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["settings"])["batch_size"] == 64


@pytest.mark.cuda
def test_sample_without_batch_size_on_cuda_fills_memory_with_the_same_samples(mlp_file, tmp_path, monkeypatch,
                                                                               capsys):
    from accelkit.acceleration import batch_to_fill_memory

    assert batch_to_fill_memory(load_teacher(mlp_file, device="cuda"), None, 100_000, "cuda") > 64
    out = {}
    for name, flags in (("auto", ()), ("64", ("--batch-size", "64"))):
        path = tmp_path / f"{name}.safetensors"
        code, _, err = run_in_process(monkeypatch, capsys, "sample", mlp_file, "--device", "cuda", "--nfe", "4",
                                      "-n", "3000", "-o", path, *flags)
        assert code == 0, err
        out[name] = load_file(path)["samples"]
    assert rel(out["auto"], out["64"]) < 1e-5
