"""`accelkit restore`: --degrade then restore through files (PNG and safetensors) and artifacts, PSNR / SSIM with a
reference, one-line errors that write nothing; and on digits, PiGDM beats the pseudo-inverse for an eps and a flow
teacher (slow: trains both)."""

import json
import math

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

from accelkit.metrics import psnr, ssim
from accelkit.stages.restore import DegradeRecipe, RestoreRecipe, run_degrade, run_restore
from accelkit.stages.train import TrainRecipe, run_train


def digits_teacher(root, objective, steps, base=16):
    loop = {"steps": steps, "lr": 2e-3, "warmup_steps": min(20, steps), "lr_schedule": "cosine",
            "checkpoint_every": 0}
    path = run_train(TrainRecipe(data="digits", objective=objective, batch_size=128, network={"base": base},
                                 eval_samples=0, device="cpu", loop=loop), root / f"train-{objective}")
    return str(path / "teacher.safetensors")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A barely trained 8x8 teacher: enough for file handling and errors, not for quality."""
    return digits_teacher(tmp_path_factory.mktemp("tiny"), "flow", 2, base=8)


def test_ssim_is_one_on_equal_images_and_falls_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 12, 12, generator=g) * 2 - 1
    assert math.isclose(ssim(x, x), 1.0, abs_tol=1e-12)
    noisy = [ssim(x + s * torch.randn(x.shape, generator=g), x) for s in (0.05, 0.2, 0.5)]
    assert 1.0 > noisy[0] > noisy[1] > noisy[2]
    # one 11x11 window over an 11x11 image: the formula by hand with the window's weights
    a, b = torch.rand(1, 1, 11, 11, generator=g), torch.rand(1, 1, 11, 11, generator=g)
    d = torch.arange(11, dtype=torch.float64) - 5
    w = torch.exp(-(d**2) / 4.5)
    w = (w[:, None] * w[None]) / w.sum() ** 2
    A, B = a[0, 0].double(), b[0, 0].double()
    ma, mb = (w * A).sum(), (w * B).sum()
    va, vb, cab = (w * A * A).sum() - ma**2, (w * B * B).sum() - mb**2, (w * A * B).sum() - ma * mb
    c1, c2 = 0.02**2, 0.06**2
    want = (2 * ma * mb + c1) * (2 * cab + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    assert math.isclose(ssim(a, b), float(want), rel_tol=1e-10)


def test_degrade_then_restore_through_safetensors_and_png(tiny, tmp_path):
    y = tmp_path / "y.safetensors"
    r = run_cli("restore", "--degrade", "digits", "--count", "3", "--task", "super-resolution", "--factor", "2",
                "--noise-std", "0.05", "-o", y)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(y)
    m = load_file(y)
    assert m["y"].shape == (3, 1, 4, 4) and m["clean"].shape == (3, 1, 8, 8)
    # y is the 2x2 average of the clean image plus noise of std 0.05
    pooled = torch.nn.functional.avg_pool2d(m["clean"], 2)
    assert 0.02 < float((m["y"] - pooled).std()) < 0.08
    out = tmp_path / "r.safetensors"
    r = run_cli("restore", tiny, "--input", y, "--method", "ddrm", "--nfe", "3", "-n", "2", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["output"] == str(out)
    t = load_file(out)
    assert t["restored"].shape == (6, 1, 8, 8) and t["baseline"].shape == (3, 1, 8, 8)
    metrics = report["summary"]["metrics"]
    assert math.isclose(metrics["baseline"]["psnr"], psnr(t["baseline"], m["clean"]), rel_tol=1e-6)
    assert set(metrics) == {"posterior_mean", "baseline", "samples"}
    # PNG in and out: one image, its mask beside it
    yp = tmp_path / "y.png"
    r = run_cli("restore", "--degrade", "digits", "--count", "1", "--task", "inpaint", "--mask", "bottom-half",
                "--noise-std", "0.05", "-o", yp)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "y-mask.png").is_file()
    rp = tmp_path / "r.png"
    r = run_cli("restore", tiny, "--input", yp, "--task", "inpaint", "--mask", tmp_path / "y-mask.png",
                "--noise-std", "0.05", "--nfe", "2", "-o", rp)
    assert r.returncode == 0, r.stderr
    from accelkit.measurements import read_png

    assert read_png(rp).shape == (1, 1, 8, 8)


def test_degrade_and_restore_artifacts_record_metrics_and_are_reused(tiny, tmp_path):
    deg = run_degrade(DegradeRecipe(clean="digits", count=4, task="inpaint", mask="random:0.5", noise_std=0.05,
                                    seed=3), tmp_path / "deg")
    recipe = RestoreRecipe(teacher=tiny, input=str(deg), method="pigdm", nfe=2, n=2, mean=True)
    art = run_restore(recipe, tmp_path / "res")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"]["measurement"]["task"] == "inpaint"
    assert manifest["summary"]["restored_shape"] == [4, 1, 8, 8]
    assert {"psnr", "ssim"} <= set(manifest["summary"]["metrics"]["posterior_mean"])
    assert (art / "restored.png").is_file()
    before = (art / "restored.safetensors").stat().st_mtime_ns
    assert run_restore(recipe, tmp_path / "res") == art
    assert (art / "restored.safetensors").stat().st_mtime_ns == before
    # the random mask is per image, seeded, and recorded in the measurement
    mask = load_file(deg / "measurement.safetensors")["mask"]
    assert mask.shape == (4, 1, 8, 8) and 0.3 < float(mask.mean()) < 0.7 and not torch.equal(mask[0], mask[1])


@pytest.mark.parametrize("args, message", [
    (("--task", "inpaint", "--mask", "MASK4", "--noise-std", "0.05"), "does not match"),
    (("--task", "super-resolution", "--factor", "3", "--noise-std", "0.05"), "does not divide"),
    (("--task", "denoise", "--noise-std", "-0.1"), "noise"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny, tmp_path, args, message, capsys, monkeypatch):
    """In-process through the console entry point (the one that maps errors to exit 2), to save 9 interpreter
    starts; the happy path above runs in subprocesses."""
    import sys

    from accelkit.cli.main import run

    class Result:
        def __init__(self, code, stderr):
            self.returncode, self.stderr = code, stderr

    def run_cli(*argv):
        monkeypatch.setattr(sys, "argv", ["accelkit", *map(str, argv)])
        capsys.readouterr()
        try:
            run()
            code = 0
        except SystemExit as e:
            code = e.code
        return Result(code, capsys.readouterr().err)

    mask4 = tmp_path / "mask4.safetensors"
    from safetensors.torch import save_file

    save_file({"mask": torch.ones(4, 4)}, str(mask4))
    args = tuple(str(mask4) if a == "MASK4" else a for a in args)
    clean = tmp_path / "clean.safetensors"
    from accelkit.data import digits

    save_file({"clean": digits()[:2].contiguous()}, str(clean))
    y_out, r_out = tmp_path / "y.safetensors", tmp_path / "r.safetensors"
    # degrade refuses ...
    r = run_cli("restore", "--degrade", clean, *args, "-o", y_out)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert not y_out.exists()
    # ... and so does restore, to a file or an artifact directory
    y_png = tmp_path / "y.png"
    from accelkit.measurements import image_bytes

    y_png.write_bytes(image_bytes(torch.zeros(1, 1, 8, 8), ".png"))
    for out in (r_out, tmp_path / "art"):
        r = run_cli("restore", tiny, "--input", y_png, *args, "-o", out)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
        assert not out.exists()


@pytest.mark.slow
def test_pigdm_beats_the_pseudo_inverse_on_digits_for_an_eps_and_a_flow_teacher(tmp_path_factory):
    """Digits (8x8), noise 0.05: half-image inpainting (bottom half hidden) and 2x super-resolution. The mean of 8
    PiGDM samples (10 NFE) beats the regularised pseudo-inverse (zero-filled for the mask) by at least 1.5 dB PSNR for
    an eps (DDPM, vp-linear) and a flow (linear) teacher, each trained 600 steps here (measured on the 2-core VM,
    9 min in all: eps +4.2 dB inpainting, +2.3 dB super-resolution; flow +4.7 dB and +2.6 dB)."""
    root = tmp_path_factory.mktemp("digits")
    for objective in ("eps", "flow"):
        teacher = digits_teacher(root, objective, 600)
        for name, kw in (("inpaint", {"task": "inpaint", "mask": "bottom-half"}),
                         ("sr", {"task": "super-resolution", "factor": 2})):
            deg = run_degrade(DegradeRecipe(clean="digits", count=32, noise_std=0.05, seed=1, **kw),
                              root / f"deg-{name}")
            art = run_restore(RestoreRecipe(teacher=teacher, input=str(deg), nfe=10, n=8, mean=True),
                              root / f"res-{objective}-{name}")
            m = json.loads((art / "manifest.json").read_text())["summary"]["metrics"]
            got, base = m["posterior_mean"]["psnr"], m["baseline"]["psnr"]
            print(f"{objective} {name}: PiGDM {got:.2f} dB (SSIM {m['posterior_mean']['ssim']:.3f}), "
                  f"pseudo-inverse {base:.2f} dB (SSIM {m['baseline']['ssim']:.3f})")
            assert got > base + 1.5
