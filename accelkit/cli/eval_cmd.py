"""``accelkit eval ARTIFACT...``: teachers, students and solvers compared on the same noise, quality against NFE."""

from __future__ import annotations

import typer

from .main import app

DEFAULT_SAMPLES = 1000


def parse_nfes(text: str) -> list[int]:
    """``"1,2,4,8"`` -> [1, 2, 4, 8]: positive integers, no repeats."""
    from ..errors import AccelkitError

    try:
        nfes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        nfes = []
    if not nfes or any(n < 1 for n in nfes) or len(set(nfes)) != len(nfes):
        raise AccelkitError(f"--nfe {text!r}: expected distinct positive integers separated by commas, e.g. 1,2,4,8")
    return nfes


@app.command("eval")
def eval_command(
    paths: list[str] = typer.Argument(None, help="Teachers / students to compare (any checkpoint accelkit sample "
                                      "takes); missing or '-': one path from stdin."),
    nfe: str = typer.Option("1,2,4,8", "--nfe", help="Comma-separated NFEs."),
    solver: str = typer.Option(None, "--solver", help="Comma-separated ODE solvers: euler, heun, "
                               "midpoint, ddim, dpm++2m, dpm++3m, unipc, unipc2, ipndm, ipndm-v, "
                               "solver-stats artifacts (DPM-Solver-v3), or bespoke "
                               "artifacts (learned solvers, at their own NFE and times) (default: euler,dpm++2m, "
                               "and for a student that records its sampler that sampler; euler with --parallel)."),
    grid: str = typer.Option(None, "--grid", help="Time grid of every solver: uniform, logsnr, edm, shift, "
                             "comma-separated times from 1 to 0, or recommended (the grid a phased reflow student "
                             "records); runs whose steps do not fit a list of times are left out (default: each "
                             "solver's own)."),
    reference: str = typer.Option(None, "--reference", help="A couple artifact: its first N noises and the "
                                  "teacher's ODE endpoints from them (default: noise of (seed, i), endpoints of the "
                                  "first model solved with heun at --reference-nfe)."),
    reference_nfe: int = typer.Option(200, "--reference-nfe", help="NFE of the heun reference solve without "
                                      "--reference."),
    data: str = typer.Option(None, "--data", help="Data to measure distribution distances against: a data set "
                             "name or a .safetensors/.npy file (default: the data set of a train artifact)."),
    features: str = typer.Option(None, "--features", help="Feature network for the Frechet distance on images: "
                                 "builtin:digits, builtin:fashion-mnist, inception:FILE (the TorchScript FID "
                                 "Inception) or a TorchScript FILE, or pixels (default: builtin for those "
                                 "data sets, else pixels)."),
    n: int = typer.Option(None, "-n", "--num-samples", help="Samples per (model, solver, NFE) (default 1000, or "
                          "every pair of a smaller --reference)."),
    seed: int = typer.Option(0, "--seed", help="Sample i starts from the noise of (seed, i); also draws the data."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as a JSON list on stdout."),
    plot: str = typer.Option(None, "--plot", help="Write a PNG of RMSE against NFE to this file."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Samples per batch."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled checkpoints (weights_only)."),
    force: bool = typer.Option(False, "--force", help="Use a learned --solver trained for another teacher."),
    parallel: str = typer.Option(None, "--parallel", help="Also run each --solver (euler or ddim) in parallel: "
                                 "picard or parareal; rows gain sequential rounds and total NFE."),
    window: int = typer.Option(None, "--window", help="picard: steps per window (default 16)."),
    tol: float = typer.Option(None, "--tol", help="picard / parareal tolerance (0: exact)."),
    blocks: int = typer.Option(None, "--blocks", help="parareal: blocks of the grid (default ~sqrt(steps))."),
    compile_network: bool = typer.Option(False, "--compile", help="Compile each model's network with torch.compile "
                                         "(samples/s then counts each batch shape's one-time compilation)."),
) -> None:
    """Quality against NFE of every model with every solver on the same noise: RMSE / PSNR to the teacher's ODE
    endpoint, distribution distance to data, path straightness and curvature, and samples per second (table on
    stderr)."""
    from ..errors import AccelkitError
    from .common import emit, input_path

    paths = list(dict.fromkeys(input_path(p, "model") for p in (paths or [None])))  # each model once
    nfes = parse_nfes(nfe)
    recorded = {}  # without --solver, a model that records its sampler (a student) is evaluated with it
    if solver is None and parallel is None and grid is None:
        from ..sampling import recorded_sampler

        recorded = {p: rec for p in paths if (rec := recorded_sampler(p)) is not None}
    if solver is None:
        solver = "euler" if parallel is not None else "euler,dpm++2m"
    solvers = [s.strip() for s in solver.split(",") if s.strip()]
    if parallel is not None or window is not None or tol is not None or blocks is not None:
        from ..solvers.parallel import wrap

        solvers = [name for s in solvers for name in (s, wrap(parallel, s, window=window, tol=tol, blocks=blocks))]
    n_given = n is not None
    n = DEFAULT_SAMPLES if n is None else n
    if n < 2:
        raise AccelkitError(f"-n {n}: expected at least 2 samples")
    if batch_size < 1:
        raise AccelkitError(f"--batch-size {batch_size}: expected at least 1")
    if reference_nfe < 2:
        raise AccelkitError(f"--reference-nfe {reference_nfe}: expected at least 2")
    if plot is not None and not plot.lower().endswith(".png"):
        raise AccelkitError(f"--plot {plot}: expected a file name ending in .png")

    import json

    import torch

    from .. import evaluation as ev
    from ..console import log
    from ..data import load_dataset
    from ..features import BUILTIN_SETS, feature_network
    from ..models.loading import load_teacher
    from ..solvers import GRID_NAMES, get_solver, is_solver, solver_names
    from ..solvers.learned import check_solver_teacher
    from ..solvers.parallel import is_parallel_spec
    from .sample_cmd import _parse_grid

    for s in solvers or [""]:
        if not is_solver(s):
            raise AccelkitError(f"--solver {s!r}: unknown solver; expected one of {', '.join(solver_names())} or a "
                                "bespoke artifact")
        if s not in solver_names() and not is_parallel_spec(s):
            for p in paths:
                check_solver_teacher(s, p, force)
    times = _parse_grid(grid) if grid is not None else None
    if times == "recommended":  # the first model that records one, for every model (students beside their teacher)
        times = next((g for g in map(ev.recommended_grid, paths) if g is not None), None)
        if times is None:
            raise AccelkitError("--grid recommended: none of the models records a recommended grid (a phased "
                                "`accelkit reflow` student does); give a grid name or times")
    if isinstance(times, list):
        from ..solvers.grids import check_user_grid

        check_user_grid(times, len(times) - 1)
    elif times is not None and times not in GRID_NAMES:
        raise AccelkitError(f"--grid {grid!r}: expected one of {', '.join(GRID_NAMES)}, recommended or "
                            "comma-separated times")
    runs: dict[str, list[int]] = {}
    for s in solvers:
        ok = []
        for k in nfes:
            try:
                steps = get_solver(s).steps(k)
            except AccelkitError:
                log(f"note: {s} cannot take {k} NFE; left out")
                continue
            if isinstance(times, list) and steps != len(times) - 1:
                log(f"note: {s} at {k} NFE takes {steps} steps, the --grid has {len(times) - 1}; left out")
                continue
            ok.append(k)
        if ok:
            runs[s] = ok
    if not runs:
        raise AccelkitError(f"--nfe {nfe}: none of the solvers {', '.join(solvers)} can take these NFEs"
                            + (f" on the {len(times) - 1}-step --grid" if isinstance(times, list) else ""))

    teachers = {p: load_teacher(p, device=device, allow_pickle=allow_pickle) for p in paths}
    if compile_network:
        from ..acceleration import accelerate

        for p, t in teachers.items():
            accelerate(t, compile=True, what=p)
    shape = tuple(teachers[paths[0]].sample_shape)
    for p, t in teachers.items():
        if tuple(t.sample_shape) != shape:
            raise AccelkitError(f"{p}: makes samples of shape {list(t.sample_shape)}, {paths[0]} makes "
                                f"{list(shape)}; models compared must share a sample shape")
    if reference is not None and not n_given:
        n = min(n, ev.couplings_size(reference))
    data_name = data
    if data is None:
        data_name = next((d for d in (ev.train_data_name(p) for p in [*paths, *([reference] if reference else [])])
                          if d), None)
    data_samples = None
    if data_name is not None:
        ds = load_dataset(data_name, size=n, seed=seed)
        if ds.sample_shape != shape:
            raise AccelkitError(f"--data {data_name}: samples of shape {list(ds.sample_shape)}, the models make "
                                f"{list(shape)}")
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(ds), generator=g)[:n] if len(ds) > n else torch.arange(len(ds))
        data_samples = ds.samples[pick].to(device)
        if features is None and data_name in BUILTIN_SETS:
            features = f"builtin:{data_name}"
    feature_net = feature_network(features, device) if features not in (None, "pixels") else None

    if reference is not None:
        noise, ref, cond, ref_text = ev.reference_from_couplings(reference, n, shape)
    else:
        from ..noise import sample_noise
        from ..sampling import condition_from_options

        noise = sample_noise(seed, range(n), shape)
        cond_fn = condition_from_options(teachers[paths[0]], paths[0], None, None)  # class labels cycled
        cond = cond_fn(list(range(n))) if cond_fn is not None else None
        from ..qac import with_codes

        ref_cond = with_codes(teachers[paths[0]], cond, seed, range(n))  # a QAC model: its codes of (seed, i)
        ref = ev.sample_batched(teachers[paths[0]], noise.to(device), ev.REFERENCE_SOLVER, reference_nfe,
                                cond=_to(ref_cond, device), batch_size=batch_size)
        ref_text = f"{paths[0]} solved with {ev.REFERENCE_SOLVER} at {reference_nfe} NFE"
    cond = _to(cond, device)
    noise, ref = noise.to(device), ref.to(device)

    rows: list[ev.QualityRow] = []
    from ..qac import with_codes
    for p, teacher in teachers.items():
        model_cond = _to(with_codes(teacher, cond, seed, range(n)), device)  # a QAC model: its codes of (seed, i)
        if p in recorded:
            rows += _evaluate_recorded(ev, teacher, recorded[p], nfes, noise, ref, data_samples, p, model_cond,
                                       batch_size, feature_net)
            continue
        for s, ks in runs.items():
            rows += ev.evaluate(teacher, noise, ref, [s], ks, data=data_samples, method=p, cond=model_cond,
                                batch_size=batch_size, features=feature_net, straightness=True, grid=times)
    distance = "" if data_name is None else (f"; SW2, MMD² to {data_name}" if shape == (2,) else
                                             f"; FD to {data_name} on " + (f"features of {features}" if feature_net
                                                                           else "pixels"))
    on_grid = "" if times is None else "; grid " + (times if isinstance(times, str) else
                                                     ",".join(f"{v:g}" for v in times))
    # n first: a long title wraps at the table's width, and "n = N" stays whole at the start of the first line
    ev.print_quality_table(rows, f"n = {n}; RMSE, PSNR (dB) to {ref_text}{distance}{on_grid}")
    if plot is not None:
        from ..plots import plot_quality

        curves: dict[str, tuple[list[int], list[float]]] = {}
        for r in sorted(rows, key=lambda r: r.nfe):  # each line from few NFE to many, whatever order --nfe gave
            key = r.solver if len(teachers) == 1 else f"{r.solver}, {r.method}"
            curves.setdefault(key, ([], []))
            curves[key][0].append(r.nfe)
            curves[key][1].append(max(r.rmse, 1e-12))  # log axis: an exact match is drawn at 1e-12
        plot_quality(curves, plot, "RMSE to the teacher's ODE endpoint", "quality against NFE")
        log(f"plot: {plot}")
    if as_json:
        emit(json.dumps([{k: _json_value(v) for k, v in r.as_dict().items()} for r in rows]))


def _evaluate_recorded(ev, teacher, rec: dict, nfes: list[int], noise, ref, data, path: str, cond, batch_size: int,
                       features) -> list:
    """A student's rows with the sampler it records: its solver at every NFE it can take, on its recorded grid at
    the recorded NFE (a list of times fits only there) or on a recorded grid name; the user's --solver wins."""
    from ..console import log
    from ..errors import AccelkitError
    from ..solvers import get_solver

    rows = []
    for k in nfes:
        try:
            get_solver(rec["solver"]).steps(k)
        except AccelkitError:
            log(f"note: {path}: its sampler {rec['solver']} cannot take {k} NFE; left out")
            continue
        grid = rec["grid"] if isinstance(rec["grid"], str) or k == rec["nfe"] else None
        rows += ev.evaluate(teacher, noise, ref, [rec["solver"]], [k], data=data, method=path, cond=cond,
                            batch_size=batch_size, features=features, straightness=True, grid=grid)
    if not rows:
        raise AccelkitError(f"{path}: its recorded sampler {rec['solver']} takes none of --nfe "
                            f"{','.join(map(str, nfes))}; give --solver")
    log(f"{path}: evaluated with the sampler it records ({rec['solver']}); --solver overrides")
    return rows


def _json_value(v):
    """JSON has no infinity or NaN: a PSNR of identical samples (inf) or an undefined value becomes null."""
    import math

    return None if isinstance(v, float) and not math.isfinite(v) else v


def _to(cond, device: str):
    return cond.map(lambda v: v.to(device)) if cond is not None else None
