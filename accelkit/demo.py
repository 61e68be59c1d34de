"""``accelkit demo``: the whole pipeline on a built-in 2-D teacher, on the CPU, in a few minutes.

1. ``train``: a flow-matching MLP on the checkerboard set (no download);
2. ``couple``: (noise, sample) pairs from its ODE solved accurately; the samples are the reference endpoints;
3. ``rescale``: the same ODE under the VP-cosine schedule (its r = 1 is the teacher's t = 1, so the noise corresponds);
4. ``couple`` + ``reflow``: a 1-rectified-flow student (Liu et al. 2022) trained from the teacher's weights on other
   couplings (seed 2), so the reference endpoints of step 2 stay held out from it;
5. ``consistency`` and ``shortcut`` on the same couplings: a consistency-distillation student (Song et al. 2023) and
   a shortcut model (Frans et al. 2024), each sampled with the sampler it records;
6. every solver at 1-16 NFE on the couplings' noise: RMSE / PSNR to the reference endpoint, sliced Wasserstein and
   MMD to fresh data; a table on stderr, ``quality.json``, ``quality.png`` and ``samples.png`` in the demo artifact.

The stages are the recipe :data:`DEMO_RECIPE` (also ``recipes/demo.yaml``) run by the same pipeline runner as
``accelkit run``, so a second ``accelkit demo`` reuses every finished artifact and an interrupted one resumes.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

DEMO_RECIPE = """\
# accelkit demo: a 2-D flow-matching teacher trained on the CPU, couplings from its ODE (held-out reference
# endpoints), a rescaled copy, and three students trained on a second, separate set of couplings: 1-rectified
# flow, consistency distillation and a shortcut model.
# `accelkit run recipes/demo.yaml` runs the same stages; `accelkit demo` also compares the solvers on them.
stages:
  - train:
      data: checkerboard
      objective: flow
      seed: 0
      batch_size: 512
      network: {fourier_features: 4}
      loop: {steps: 1800, lr: 2.0e-3, warmup_steps: 100, lr_schedule: cosine, ema_rates: []}
  - couple:
      teacher: "@train"
      n: 2000
      solver: heun
      nfe: 200
      seed: 1
      micro_batch: 250
      shard_size: 1000
  - rescale:
      teacher: "@train"
      to: vp-cosine
  - couple:
      teacher: "@train"
      n: 4000
      solver: dpm++2m
      nfe: 32
      seed: 2
      micro_batch: 250
      shard_size: 2000
  - reflow:
      couplings: "@couple"
      method: rectified-flow
      batch_size: 256
      loop: {steps: 500, lr: 1.0e-3, warmup_steps: 20}
  - consistency:
      source: "@couple"
      method: cd
      batch_size: 256
      loop: {steps: 300, lr: 1.0e-3, warmup_steps: 20}
  - shortcut:
      source: "@couple"
      method: shortcut
      anchor: teacher
      batch_size: 256
      loop: {steps: 300, lr: 1.0e-3, warmup_steps: 20}
"""

SOLVERS = ("euler", "heun", "midpoint", "dpm++2m", "dpm++3m", "unipc", "ipndm")
RESCALED_SOLVERS = ("euler", "heun")
NFES = (1, 2, 4, 8, 16)
STUDENT_SOLVER = "euler"
STUDENT_NFES = (1, 2, 4)
STUDENT = "rectified flow"
#: The students the demo trains: (stage, the name its rows carry); each is sampled with the sampler it records.
STUDENTS = (("reflow", STUDENT), ("consistency", "consistency (cd)"), ("shortcut", "shortcut"))
KIND = "demo"


def _plan(sets: Sequence[str]):
    from .recipes import resolve_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo.yaml"
        path.write_text(DEMO_RECIPE)
        return resolve_pipeline(path, sets)


def _supported(solver: str, nfes: Sequence[int]) -> list[int]:
    """The NFEs a solver can take (two-stage methods need at least 2)."""
    from .solvers import get_solver

    out = []
    for n in nfes:
        try:
            get_solver(solver).steps(n)
        except Exception:  # a solver that cannot run at this NFE is left out of the table, not faked
            continue
        out.append(n)
    return out


def run_demo(output: Path | None = None, sets: Sequence[str] = (), force: bool = False) -> Path:
    """Run the demo's stages (reused / resumed / run), evaluate, and write the demo artifact; returns its path."""
    import torch

    from .artifacts import Artifact
    from .console import log
    from .couplings import open_couplings
    from .data import load_dataset
    from .evaluation import QualityRow, evaluate, print_quality_table
    from .models.loading import load_teacher
    from .pipeline import run_pipeline
    from .plots import plot_quality, plot_scatter_panels
    from .recipes import pipeline_as_data
    from .sampling import recorded_sampler

    plan = _plan(sets)
    outputs: dict[int, Path] = {}
    run_pipeline(plan, force=force, outputs=outputs)
    by_name = {p.name: outputs[p.index] for p in reversed(plan)}  # the first stage of each name
    train = next(p.recipe for p in plan if p.name == "train")

    recipe = {"pipeline": pipeline_as_data(plan), "solvers": list(SOLVERS), "rescaled_solvers": list(RESCALED_SOLVERS),
              "nfes": list(NFES), "student": {"solver": STUDENT_SOLVER, "nfes": list(STUDENT_NFES)},
              "data_seed": 12345}
    inputs = {p.label: str(outputs[p.index]) for p in plan}
    with Artifact.open(output, KIND, recipe, inputs, force=force, seeds={"data_seed": 12345}) as art:
        if art.state == "complete":
            log(f"reusing {art.path}")
            rows = [QualityRow(**r) for r in json.loads(art.file("quality.json").read_text())["rows"]]
            print_quality_table(rows, "accelkit demo: quality against NFE (reused)")
            return art.path
        teacher = load_teacher(by_name["train"])
        rescaled = load_teacher(by_name["rescale"])
        students = {label: (load_teacher(by_name[stage]), recorded_sampler(str(by_name[stage])))
                    for stage, label in STUDENTS if stage in by_name}
        student = students[STUDENT][0]
        pairs = open_couplings(by_name["couple"])[:]
        noise, reference = pairs["noise"], pairs["sample"]
        data = load_dataset(train.data, size=len(noise), seed=recipe["data_seed"]).samples
        torch.set_grad_enabled(False)
        rows: list[QualityRow] = []
        for solver in SOLVERS:
            rows += evaluate(teacher, noise, reference, [solver], _supported(solver, NFES), data=data)
        for solver in RESCALED_SOLVERS:
            rows += evaluate(rescaled, noise, reference, [solver], _supported(solver, NFES), data=data,
                             method=rescaled.schedule.name)
        for label, (model, rec) in students.items():
            solver = rec["solver"] if rec is not None else STUDENT_SOLVER
            rows += evaluate(model, noise, reference, [solver], _supported(solver, STUDENT_NFES), data=data,
                             method=label)
        print_quality_table(rows, f"quality against NFE: RMSE, PSNR (dB) to the teacher's ODE endpoint; SW2, MMD² to "
                                  f"fresh data; ({rescaled.schedule.name}): the teacher rescaled to that schedule; "
                                  f"({', '.join(students)}): the students, each with the sampler it records")
        quality = {"rows": [r.as_dict() for r in rows], "reference": {"solver": "heun", "nfe": int(plan[1].recipe.nfe)}}
        if train.data == "checkerboard":  # has the teacher learned the board? its ODE endpoints on the dark squares
            from .data import checkerboard_share

            quality["teacher_on_dark_squares"] = checkerboard_share(reference)
            log(f"the teacher's ODE samples on the checkerboard's dark squares: "
                f"{100 * quality['teacher_on_dark_squares']:.1f} % (data: 100 %)")
        art.write_json("quality.json", quality)

        curves: dict[str, tuple[list[int], list[float]]] = {}
        for r in rows:
            key = r.solver if r.method == "teacher" else f"{r.solver}, {r.method}"
            curves.setdefault(key, ([], []))
            curves[key][0].append(r.nfe)
            curves[key][1].append(max(r.rmse, 1e-12))
        plot_quality(curves, art.file("quality.png"), "RMSE to the ODE endpoint",  # plots are written atomically
                     f"{train.data} flow teacher: solvers against NFE")
        art.record_file("quality.png")

        best4 = min((r for r in rows if r.nfe == 4 and r.method == "teacher"), key=lambda r: r.rmse)
        from .evaluation import sample_batched

        panels = {"data": data.numpy(), "teacher ODE (heun, 200 NFE)": reference.numpy(),
                  "euler, 4 NFE": sample_batched(teacher, noise, "euler", 4).numpy(),
                  f"{best4.solver}, 4 NFE": sample_batched(teacher, noise, best4.solver, 4).numpy(),
                  f"{STUDENT}, euler, 1 NFE": sample_batched(student, noise, "euler", 1).numpy()}
        for label, (model, rec) in students.items():
            if label != STUDENT and rec is not None:
                panels[f"{label}, 1 NFE"] = sample_batched(model, noise, rec["solver"], 1).numpy()
        plot_scatter_panels(panels, art.file("samples.png"))
        art.record_file("samples.png")
        euler4 = next(r for r in rows if r.nfe == 4 and r.method == "teacher" and r.solver == "euler")
        log(f"at 4 NFE the best solver, {best4.solver}, is {euler4.rmse / best4.rmse:.1f}x closer to the teacher's "
            f"ODE endpoint than euler; plots: {art.file('quality.png')}, {art.file('samples.png')}")
        best1 = min((r for r in rows if r.nfe == 1 and r.method == "teacher"), key=lambda r: r.sliced_w2)
        for label in students:
            student1 = next(r for r in rows if r.nfe == 1 and r.method == label)
            log(f"at 1 NFE the {label} student's samples are {best1.sliced_w2 / student1.sliced_w2:.1f}x closer to "
                f"the data (sliced Wasserstein) than the teacher's with its best solver, {best1.solver}")
        art.complete({"best_at_4_nfe": best4.solver, "rmse_at_4_nfe": {r.solver: r.rmse for r in rows
                                                                        if r.nfe == 4 and r.method == "teacher"}})
        return art.path


__all__ = ["DEMO_RECIPE", "run_demo", "SOLVERS", "NFES"]
