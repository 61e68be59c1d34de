"""Feature networks for the Frechet distance on images (FID-style: Heusel et al. 2017, "GANs trained by a two
time-scale update rule converge to a local Nash equilibrium").

FD = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) on the features of a fixed network. Inception-v3 is the
standard network for natural images; for the small grey data sets accelkit trains on (scikit-learn's 8x8 digits,
Fashion-MNIST) it is the wrong instrument, so accelkit ships a small classifier for each
(:class:`FeatureClassifier`, weights in ``accelkit/weights/``, made by ``scripts/train_feature_nets.py``) and uses the
64 features before its class layer. Three sources of features, none downloaded:

* ``builtin:digits`` / ``builtin:fashion-mnist`` (the default for these data sets in ``accelkit eval``);
* ``inception:FILE``: the TorchScript Inception-v3 of the StyleGAN / clean-fid FID code (``inception-2015-12-05.pt``)
  that the user has on disk: samples in [-1, 1] go in as 0..255 RGB and the 2048 pool features come out;
* ``FILE``: any TorchScript module mapping a batch of samples to a batch of feature vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import AccelkitError

WEIGHTS_DIR = Path(__file__).parent / "weights"
BUILTIN_SETS = {"digits": (1, 8), "fashion-mnist": (1, 28)}  # name -> (channels, side)
FEATURE_DIM = 64


class FeatureClassifier(nn.Module):
    """A small CNN classifier; ``features(x)`` is the 64-vector before the class layer.

    conv3x3(32) - SiLU - conv3x3/2(64) - SiLU - conv3x3/2(64) - SiLU - global mean - linear(64) - SiLU | linear(10).
    The global mean makes one architecture fit 8x8 and 28x28 inputs.
    """

    def __init__(self, channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.embed = nn.Sequential(nn.Linear(64, FEATURE_DIM), nn.SiLU())
        self.head = nn.Linear(FEATURE_DIM, classes)

    def features(self, x: Tensor) -> Tensor:
        return self.embed(self.body(x).mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def builtin_weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"features-{name}.safetensors"


def load_builtin(name: str, device: str = "cpu") -> FeatureClassifier:
    """The shipped classifier for data set ``name`` (digits or fashion-mnist)."""
    from safetensors.torch import load_file

    if name not in BUILTIN_SETS:
        raise AccelkitError(f"--features builtin:{name}: no shipped feature network for {name!r}; expected one of "
                            f"{', '.join(BUILTIN_SETS)}")
    path = builtin_weights_path(name)
    if not path.is_file():
        raise AccelkitError(f"{path}: shipped feature network missing; reinstall accelkit or run "
                            f"scripts/train_feature_nets.py")
    net = FeatureClassifier(BUILTIN_SETS[name][0])
    net.load_state_dict(load_file(str(path)))
    return net.to(device).eval()


def _torchscript(path: str, option: str, device: str) -> torch.jit.ScriptModule:
    p = Path(path)
    if not p.is_file():
        raise AccelkitError(f"--features {option}: no such file {path}; expected a TorchScript feature network")
    try:
        return torch.jit.load(str(p), map_location=device).eval()
    except Exception as e:  # torch raises RuntimeError / ValueError with long messages for non-TorchScript files
        first = " ".join(str(e).split())[:200]
        raise AccelkitError(f"--features {option}: {path} is not a TorchScript module ({first})") from None


def to_inception_input(x: Tensor) -> Tensor:
    """Samples in [-1, 1], (N, C, H, W) with C = 1 or 3 -> 0..255 RGB float, the input of the FID Inception."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise AccelkitError(f"--features inception: samples of shape {list(x.shape[1:])}; expected 1- or 3-channel "
                            f"images")
    x = ((x.clamp(-1, 1) + 1) * 127.5).round()  # the quantisation a saved PNG would have
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def feature_network(spec: str, device: str = "cpu") -> Callable[[Tensor], Tensor]:
    """The feature function for ``spec`` (``builtin:NAME``, ``inception:FILE`` or a TorchScript FILE): a batch of
    samples -> (N, D) float64 features on the CPU. Nothing is downloaded."""
    if spec.startswith("builtin:"):
        net = load_builtin(spec.removeprefix("builtin:"), device)

        def run(x: Tensor) -> Tensor:
            return net.features(x)
    elif spec.startswith("inception:"):
        net = _torchscript(spec.removeprefix("inception:"), spec, device)

        def run(x: Tensor) -> Tensor:
            return net(to_inception_input(x), return_features=True)
    else:
        net = _torchscript(spec, spec, device)
        run = net

    @torch.no_grad()
    def features(x: Tensor) -> Tensor:
        return run(x.to(device=device, dtype=torch.float32)).reshape(x.shape[0], -1).double().cpu()

    return features
