"""What the student benches share: running accelkit, the machine, a teacher with its training and held-out
couplings, the teacher's best standard solver at each NFE, and a class-conditional digits teacher.

The student benches (consistency.py, shortcut.py, students.py; qac.py uses the runner pieces) follow one set-up:
train a teacher with ``accelkit train`` (a SmallUNet on scikit-learn's 8x8 digits, an MLP on a 2-D set), draw
couplings from its ODE (dpm++2m at 32 NFE) for training and a held-out set from another seed for evaluation, measure
the teacher with the best of euler, heun, dpm++2m and unipc at each NFE (the baseline), then train students with the
same steps and batch and measure them with ``accelkit eval`` on the held-out pairs: RMSE to the teacher's ODE
endpoint of the same noise, and the distance to the data (the Frechet distance on the shipped feature network for
images, sliced W2 on 2-D).

The scripts run as ``python bench/NAME.py``, so this module is imported as ``common`` (bench/ is on sys.path).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

STANDARD_SOLVERS = "euler,heun,dpm++2m,unipc"
IMAGE_SETS = ("digits", "fashion-mnist")
#: The couplings of every student bench: the teacher's ODE by dpm++2m at 32 NFE.
COUPLE_SOLVER, COUPLE_NFE = "dpm++2m", 32


def accelkit(*args: object) -> str:
    """Run one accelkit command; its stdout (an artifact path or JSON). A failure ends the bench with its stderr."""
    return accelkit_rss(*args)[0]


def accelkit_rss(*args: object) -> tuple[str, int]:
    """Run one accelkit command; (its stdout, its peak resident memory in MiB, from the kernel's rusage of that
    process). A failure ends the bench with its stderr."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "accelkit", *map(str, args)], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code != 0:
        sys.exit(f"accelkit {' '.join(map(str, args))} failed:\n{stderr[-2000:]}")
    return stdout.strip(), usage.ru_maxrss // 1024


def summary(path: str | Path) -> dict:
    """The ``summary`` of an artifact's manifest."""
    return json.loads((Path(path) / "manifest.json").read_text()).get("summary", {})


def steps_per_second(path: str | Path) -> float:
    """Optimizer steps per second of a training artifact's last run (NaN when it does not say)."""
    s = summary(path)
    return s["steps"] / s["seconds_last_run"] if s.get("seconds_last_run") else float("nan")


def write(path: str | Path, out: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1) + "\n")


def machine() -> tuple[str, str]:
    """(the device every stage runs on, a one-line description of the machine)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", f"{platform.machine()} {os.cpu_count()} cores, {torch.cuda.get_device_name(0)}"
    threads = os.environ.get("OMP_NUM_THREADS")
    return "cpu", f"{platform.machine()} {os.cpu_count()} cores, no GPU" + (f", OMP_NUM_THREADS={threads}"
                                                                           if threads else "")


def distance_key(data: str) -> str:
    """The eval row's distance to the data: ``frechet`` on an image set, ``sliced_w2`` on a 2-D one."""
    return "frechet" if data in IMAGE_SETS else "sliced_w2"


def train_teacher(data: str, steps: int, output: Path, objective: str = "flow", sets: Iterable[str] = (),
                  device: str | None = None) -> str:
    """``accelkit train`` of a teacher on ``data`` (each of ``sets`` a ``train.key=value`` override)."""
    extra = [a for s in sets for a in ("--set", s)] + (["--device", device] if device else [])
    return accelkit("train", "--data", data, "--objective", objective, "--steps", steps, *extra, "-o", output)


def couplings(teacher: str | Path, n_pairs: int, n_held: int, device: str, workdir: Path, suffix: str = "",
              extra: Sequence[object] = ()) -> tuple[str, str]:
    """(training couplings of seed 1, held-out couplings of seed 2) of ``teacher``'s ODE, in workdir/pairs{suffix}
    and workdir/held{suffix}; ``extra``: more ``accelkit couple`` options (e.g. ``--conditions FILE``)."""
    common = ["--solver", COUPLE_SOLVER, "--nfe", COUPLE_NFE, "--micro-batch", 256, "--device", device, *extra]
    pairs = accelkit("couple", teacher, "-n", n_pairs, *common, "--seed", 1, "-o", workdir / f"pairs{suffix}")
    held = accelkit("couple", teacher, "-n", n_held, *common, "--seed", 2, "-o", workdir / f"held{suffix}")
    return pairs, held


def evaluate(models: Sequence[str | Path], reference: str, n: int, device: str, nfes: Sequence[int],
             solvers: str | None = None, data: str | None = None) -> list[dict]:
    """``accelkit eval --json`` rows of ``models`` on the held-out couplings ``reference``; ``solvers`` None: each
    student with the sampler it records; ``data`` None: the train artifact's data set."""
    args: list[object] = ["eval", *models, "--nfe", ",".join(map(str, nfes)), "--reference", reference, "-n", n,
                          "--device", device, "--json"]
    if solvers is not None:
        args += ["--solver", solvers]
    if data is not None:
        args += ["--data", data]
    return json.loads(accelkit(*args))


def teacher_best(teacher: str | Path, reference: str, n: int, device: str, nfes: Sequence[int],
                 data: str | None = None, solvers: str = STANDARD_SOLVERS) -> dict[int, dict]:
    """The teacher's eval row with the lowest RMSE to its own endpoint at each NFE, over ``solvers``."""
    rows = evaluate([teacher], reference, n, device, nfes, solvers, data)
    return {k: min((r for r in rows if r["nfe"] == k), key=lambda r: r["rmse"]) for k in nfes}


def class_conditional_digits_teacher(output: Path, steps: int, base: int = 32, batch_size: int = 256,
                                     null_share: float = 0.1, seed: int = 0, device: str = "cpu") -> tuple[Path, Path]:
    """A class-conditional flow-matching SmallUNet on the digits (10 classes and a null class 10), trained with
    classifier-free guidance's label dropout (Ho & Salimans 2022): each example's label is replaced by the null class
    with probability ``null_share``, so the one network gives both out_cond and out_null.

    ``accelkit train`` trains unconditional teachers only; this uses its network and objective
    (:func:`accelkit.stages.train.build_teacher_network`, :class:`accelkit.objectives.DenoisingObjective`) on
    :class:`accelkit.training.Trainer`, and writes the EMA weights as an accelkit teacher file. Returns (the teacher
    file, a conditions file of the labels 0..9 for ``accelkit couple --conditions``, row i takes i mod 10). A
    complete file of the same settings is reused."""
    import torch
    from sklearn.datasets import load_digits

    from accelkit.data import BatchSampler, digits
    from accelkit.models.builtin import build_network
    from accelkit.models.loading import save_teacher
    from accelkit.objectives import DenoisingObjective
    from accelkit.stages.train import TrainRecipe, build_teacher_network, make_teacher
    from accelkit.training import LoopConfig, Trainer

    output.mkdir(parents=True, exist_ok=True)
    file, labels_file, settings_file = output / "teacher.safetensors", output / "labels.json", output / "settings.json"
    settings = {"steps": steps, "base": base, "batch_size": batch_size, "null_share": null_share, "seed": seed}
    if file.exists() and settings_file.exists() and json.loads(settings_file.read_text()) == settings:
        return file, labels_file
    images = digits()
    labels = torch.as_tensor(load_digits().target, dtype=torch.long)  # the same order as accelkit.data.digits()
    classes = int(labels.max()) + 1
    recipe = TrainRecipe(data="digits", objective="flow", batch_size=batch_size, seed=seed,
                         network={"base": base}, device=device)
    arch, config = build_teacher_network(recipe, tuple(images.shape[1:]))
    config["num_classes"] = classes
    torch.manual_seed(seed)
    network = build_network(arch, config)
    teacher = make_teacher(network, recipe, tuple(images.shape[1:]), {})
    objective = DenoisingObjective(teacher.schedule, teacher.prediction, teacher.call, teacher.time_input)
    draw_time_and_noise = objective.noise_fn(tuple(images.shape[1:]))

    def draw(generator: torch.Generator, n: int) -> dict[str, torch.Tensor]:
        return {**draw_time_and_noise(generator, n), "null": torch.rand(n, generator=generator) < null_share}

    def loss(net: torch.nn.Module, batch: dict[str, torch.Tensor]):
        index = batch["x"].cpu()  # the sampler walks the indices, so each image keeps its label
        shown = torch.where(batch["null"].cpu(), torch.full_like(labels[index], classes), labels[index])
        at = batch["eps"].device
        return objective.loss(net, {"x": images[index].to(at), "t": batch["t"], "eps": batch["eps"],
                                    "cond.class_labels": shown.to(at)})

    sampler = BatchSampler(torch.arange(len(images)), batch_size, seed, noise=draw)
    loop = LoopConfig(steps=steps, lr=1e-3, warmup_steps=min(100, steps // 10), ema_rates=[0.999],
                      checkpoint_every=0)
    trainer = Trainer(network, loss, sampler, loop, device=device)
    trainer.fit()
    network.load_state_dict(trainer.ema_weights(0.999))
    info = {"trained_by": "bench/common.py class_conditional_digits_teacher", "data": "digits", "steps": steps,
            "null_class": classes, "null_share": null_share, "weights": "ema 0.999", "seed": seed}
    teacher = make_teacher(network.cpu().eval().requires_grad_(False), recipe, tuple(images.shape[1:]), info)
    save_teacher(teacher, file)
    labels_file.write_text(json.dumps(list(range(classes))))
    settings_file.write_text(json.dumps(settings))
    return file, labels_file
