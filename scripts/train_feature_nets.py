"""Train the feature networks accelkit ships (accelkit/weights/features-{digits,fashion-mnist}.safetensors).

    python scripts/train_feature_nets.py [--sets digits,fashion-mnist] [--check]

Each is an :class:`accelkit.features.FeatureClassifier` trained as a classifier (cross-entropy, AdamW, seeded, one
torch thread) on the data set's training images: scikit-learn digits split 1500 / 297 by a seeded permutation,
Fashion-MNIST 60000 / 10000 (its own split). The held-out accuracy and the weights' SHA-256 are printed and written
beside the weights as JSON; ``--check`` retrains and compares with the shipped files instead of writing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

import torch
import torch.nn.functional as F

from accelkit.artifacts import atomic_write_bytes, safetensors_bytes
from accelkit.features import BUILTIN_SETS, WEIGHTS_DIR, FeatureClassifier, builtin_weights_path

SETTINGS = {"digits": {"epochs": 60, "batch": 64, "lr": 2e-3}, "fashion-mnist": {"epochs": 4, "batch": 128, "lr": 2e-3}}


def labelled(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels), images in [-1, 1] as accelkit.data gives them."""
    import numpy as np

    from accelkit import data

    if name == "digits":
        from sklearn.datasets import load_digits

        x, y = data.digits(), torch.from_numpy(load_digits().target.astype(np.int64))
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        return x[perm[:1500]], y[perm[:1500]], x[perm[1500:]], y[perm[1500:]]
    root = data.FASHION_MNIST_DIR
    ys = {s: torch.from_numpy(data.read_idx(root / f"{p}-labels-idx1-ubyte.gz").astype(np.int64))
          for s, p in (("train", "train"), ("test", "t10k"))}
    return data.fashion_mnist("train"), ys["train"], data.fashion_mnist("test"), ys["test"]


def accuracy(net: FeatureClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.cat([net(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)]).eq(y).float().mean())


def train(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    s = SETTINGS[name]
    xtr, ytr, xte, yte = labelled(name)
    torch.manual_seed(0)
    net = FeatureClassifier(BUILTIN_SETS[name][0])
    opt = torch.optim.AdamW(net.parameters(), lr=s["lr"], weight_decay=1e-4)
    steps = s["epochs"] * (len(xtr) // s["batch"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s["lr"], total_steps=steps)
    g = torch.Generator().manual_seed(1)
    start = time.time()
    for epoch in range(s["epochs"]):
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(len(xtr) // s["batch"]):
            idx = perm[i * s["batch"]:(i + 1) * s["batch"]]
            loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"{name} epoch {epoch + 1}/{s['epochs']} loss {loss.item():.3f} ({time.time() - start:.0f} s)",
              file=sys.stderr)
    net.eval()
    info = {"data": name, "train_accuracy": accuracy(net, xtr, ytr), "test_accuracy": accuracy(net, xte, yte),
            "train_images": len(xtr), "test_images": len(xte), "settings": s, "seed": 0}
    return {k: v.detach().contiguous() for k, v in net.state_dict().items()}, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(BUILTIN_SETS))
    ap.add_argument("--check", action="store_true", help="compare with the shipped weights instead of writing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    WEIGHTS_DIR.mkdir(exist_ok=True)
    for name in args.sets.split(","):
        tensors, info = train(name)
        blob = safetensors_bytes(tensors, {"accelkit.feature_network": name})
        info["sha256"] = hashlib.sha256(blob).hexdigest()
        print(json.dumps(info))
        path = builtin_weights_path(name)
        if args.check:
            same = path.is_file() and path.read_bytes() == blob
            print(f"{path}: {'identical' if same else 'DIFFERS'}", file=sys.stderr)
            continue
        atomic_write_bytes(path, blob)
        atomic_write_bytes(path.with_suffix(".json"), (json.dumps(info, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
