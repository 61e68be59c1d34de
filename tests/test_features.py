"""The shipped feature networks classify their data sets, and their Frechet distance orders sample sets the way image
quality does: real vs real small, real vs corrupted large, identical sets zero."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from accelkit.errors import AccelkitError
from accelkit.features import feature_network, load_builtin, to_inception_input
from accelkit.metrics import feature_statistics, frechet_distance

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from train_feature_nets import accuracy, labelled  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file()


def fd(features, a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance(*feature_statistics(features(a)), *feature_statistics(features(b)))


# shipped: digits 97.6 %, fashion-mnist 80.9 % held-out accuracy (scripts/train_feature_nets.py, 4 epochs)
@pytest.mark.parametrize("name, floor", [("digits", 0.95),
                                         pytest.param("fashion-mnist", 0.78, marks=pytest.mark.skipif(
                                             not FASHION, reason="needs dataset-fashion-mnist"))])
def test_shipped_network_classifies_held_out_images(name, floor):
    _, _, x_test, y_test = labelled(name)
    assert accuracy(load_builtin(name), x_test, y_test) >= floor


def test_digits_frechet_distance_ranks_real_above_corrupted():
    from accelkit.data import digits

    x = digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    a, b = x[perm[:800]], x[perm[800:1600]]
    features = feature_network("builtin:digits")
    noisy = (b + 0.5 * torch.randn(b.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    blurred = torch.nn.functional.avg_pool2d(b, 3, stride=1, padding=1, count_include_pad=False)
    same, real, corrupt_noise, corrupt_blur = fd(features, a, a), fd(features, a, b), fd(features, a, noisy), \
        fd(features, a, blurred)
    assert abs(same) < 1e-6
    assert corrupt_noise > 5 * real and corrupt_blur > 3 * real  # measured: 8.7x and 60.8x


def test_inception_spec_feeds_0_255_rgb_and_asks_for_features(tmp_path):
    class FakeInception(torch.nn.Module):  # the call signature of the StyleGAN / clean-fid TorchScript Inception
        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert return_features and img.shape[1] == 3
            return torch.stack([img.amin(dim=(1, 2, 3)), img.amax(dim=(1, 2, 3))], dim=1)

    torch.jit.script(FakeInception()).save(str(tmp_path / "inception.pt"))
    features = feature_network(f"inception:{tmp_path / 'inception.pt'}")
    x = torch.tensor([-1.0, 1.0, 0.0, 0.5]).reshape(1, 1, 2, 2)
    assert features(x).tolist() == [[0.0, 255.0]]
    assert to_inception_input(x).flatten().tolist()[:4] == [0.0, 255.0, 128.0, 191.0]  # round(127.5 * (x + 1))


def test_bad_feature_specs_are_one_line_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for spec, needle in [("builtin:cifar10", "cifar10"), (f"inception:{tmp_path / 'none.pt'}", "none.pt"),
                         (str(tmp_path / "notes.txt"), "TorchScript")]:
        with pytest.raises(AccelkitError, match=needle):
            feature_network(spec)
