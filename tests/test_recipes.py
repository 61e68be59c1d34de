"""Recipes: YAML floats, validation errors naming the key, --set overrides, config show round trip, pipelines."""

import pytest

from accelkit.errors import AccelkitError
from accelkit.recipes import apply_sets, load_yaml, parse_set, resolve_pipeline, resolve_stage
from accelkit.stages.couple import CoupleRecipe


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_reads_exponent_floats_as_floats():
    data = load_yaml("a: 1e-4\nb: 1E5\nc: 3.0e+2\nd: 12\ne: '1e-4'\nf: .5\ng: 1.\nh: -2e3\ni: .inf\n")
    assert data["a"] == pytest.approx(1e-4) and isinstance(data["a"], float)
    assert data["b"] == 1e5 and isinstance(data["b"], float)
    assert data["c"] == 300.0 and isinstance(data["d"], int) and data["e"] == "1e-4"
    assert data["f"] == 0.5 and data["g"] == 1.0 and data["h"] == -2000.0 and data["i"] == float("inf")


def test_yaml_duplicate_key_is_an_error():
    with pytest.raises(AccelkitError, match=r"r.yaml:2:.*duplicate key 'n'"):
        load_yaml("n: 1\nn: 2\n", "r.yaml")


def test_set_values_parse_as_yaml():
    assert parse_set("couple.nfe=8") == (["couple", "nfe"], 8)
    assert parse_set("reflow.lr=1e-4")[1] == pytest.approx(1e-4)
    assert parse_set("stages[1].couple.grid=[1.0, 0.5, 0.0]") == (["stages", 1, "couple", "grid"], [1.0, 0.5, 0.0])
    with pytest.raises(AccelkitError, match="expected stage.key=value"):
        parse_set("nfe8")


@pytest.mark.parametrize("text, message", [
    ("stages:\n  - couple: {teacher: t, n: 4, nfee: 8}\n",
     r"r.yaml: stages\[0\].couple.nfee: unknown key; expected one of: teacher, n, solver"),
    ("stages:\n  - couple: {teacher: t, n: 4}\n  - couple: {teacher: t, n: 4, nfe: eight}\n",
     r"stages\[1\].couple.nfe: expected a valid integer.*'eight'"),
    ("stages:\n  - couple: {teacher: t, n: 4, nfe: 0}\n",
     r"stages\[0\].couple.nfe: expected greater than or equal to 1, got 0"),
    ("stages:\n  - couple: {teacher: t, n: 4, solver: rk99}\n",
     r"stages\[0\].couple.solver: expected one of .*euler.*, got 'rk99'"),
    ("stages:\n  - couple: {n: 4}\n", r"stages\[0\].couple.teacher: required key is missing"),
    ("stages:\n  - kouple: {n: 4}\n", r"stages\[0\].kouple: unknown stage; expected one of .*couple"),
    ("stages:\n  - couple: {teacher: t, n: 4, reflow_x: '@reflow'}\n", r"reflow_x: unknown key"),
    ("stages:\n  - couple: {teacher: '@1', n: 4}\n", r"stages\[0\].couple.teacher: '@1' must name an earlier"),
    ("stagess: []\n", r"stagess: unknown top-level key; expected 'stages' or a stage name"),
])
def test_malformed_recipes_name_the_key(tmp_path, text, message):
    with pytest.raises(AccelkitError, match=message):
        resolve_pipeline(write(tmp_path, text))


def test_stage_resolution_precedence(tmp_path):
    p = write(tmp_path, "couple:\n  teacher: t.safetensors\n  n: 10\n  nfe: 4\n  seed: 3\n")
    r = resolve_stage("couple", p, {"nfe": 6, "seed": None}, ["couple.seed=9"])
    assert (r.teacher, r.n, r.nfe, r.seed) == ("t.safetensors", 10, 6, 9)
    with pytest.raises(AccelkitError, match=r"r.yaml: couple: shard_size 100 must be a multiple of micro_batch 64$"):
        resolve_stage("couple", p, {}, ["couple.shard_size=100"])
    with pytest.raises(AccelkitError, match=r"--set 'nfe=4': expected stage.key=value"):
        resolve_stage("couple", p, {}, ["nfe=4"])


def test_set_applies_to_stages_by_name_or_index():
    data = {"stages": [{"couple": {"n": 1}}, {"couple": {"n": 2}}]}
    apply_sets(data, ["couple.nfe=3", "stages[1].couple.n=5"])
    assert data["stages"] == [{"couple": {"n": 1, "nfe": 3}}, {"couple": {"n": 5, "nfe": 3}}]
    with pytest.raises(AccelkitError, match="no 'reflow' stage"):
        apply_sets(data, ["reflow.lr=1"])


def test_identity_leaves_out_execution_settings():
    a = CoupleRecipe(teacher="a", n=4, batch_size=8, checkpoint_every=1.0)
    b = CoupleRecipe(teacher="b", n=4, batch_size=64)
    assert a.identity_dict() == b.identity_dict()
    assert CoupleRecipe(teacher="a", n=5).identity_dict() != a.identity_dict()


def test_config_show_round_trips(cli, tmp_path):
    p = write(tmp_path, "stages:\n  - couple:\n      teacher: t.safetensors\n      n: 100\n      nfe: 4\n"
                        "  - couple: {teacher: t.safetensors, n: 50, grid: [1.0, 0.5, 0.0], nfe: 2, solver: euler}\n")
    out = cli("config", "show", p, "--set", "stages[0].couple.checkpoint_every=1e-4")
    assert out.returncode == 0, out.stderr
    shown = load_yaml(out.stdout)
    assert shown["stages"][0]["couple"]["checkpoint_every"] == pytest.approx(1e-4)
    assert shown["stages"][0]["couple"]["micro_batch"] == 64  # defaults filled in
    again = write(tmp_path, out.stdout, "shown.yaml")
    out2 = cli("config", "show", again)
    assert out2.returncode == 0, out2.stderr
    assert out2.stdout == out.stdout


def test_bad_recipe_fails_before_work_with_exit_2(cli, tmp_path):
    p = write(tmp_path, "stages:\n  - couple: {teacher: t.safetensors, n: -3}\n")
    out = cli("run", p)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: ") and "stages[0].couple.n" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


def test_pipeline_references_earlier_outputs_and_reuses(tmp_path, monkeypatch):
    """A two-stage pipeline through the registry: the second stage reads the first one's artifact via '@toy'."""
    from pathlib import Path

    from accelkit.artifacts import Artifact, read_manifest
    from accelkit.pipeline import run_pipeline
    from accelkit.recipes import StageRecipe, register_stage

    monkeypatch.setenv("ACCELKIT_RUNS", str(tmp_path / "runs"))
    calls = []

    class ToyRecipe(StageRecipe):
        """toy: writes value (+ the source artifact's value)."""

        input_fields = ("source",)
        value: int
        source: str | None = None

    def run_toy(recipe, output, force):
        with Artifact.open(output, "toy", recipe, recipe.inputs(), force=force) as art:
            if art.state != "complete":
                calls.append(recipe.value)
                base = int((Path(recipe.source) / "v.txt").read_text()) if recipe.source else 0
                art.write_file("v.txt", str(base + recipe.value).encode())
                art.complete()
            return art.path

    register_stage("toy", ToyRecipe, run_toy)
    recipe = tmp_path / "p.yaml"
    recipe.write_text("stages:\n  - toy: {value: 2}\n  - toy: {value: 40, source: '@toy'}\n")
    plan = resolve_pipeline(recipe)
    assert plan[1].refs == {"source": 0}
    assert run_pipeline(plan, dry_run=True) is None and not (tmp_path / "runs").exists()
    last = run_pipeline(plan)
    assert (last / "v.txt").read_text() == "42" and calls == [2, 40]
    first = Path(read_manifest(last)["inputs"]["source"]["path"])
    assert first.parent == tmp_path / "runs" and first.name.startswith("toy-")
    assert run_pipeline(resolve_pipeline(recipe)) == last and calls == [2, 40]  # both reused
    recipe.write_text("stages:\n  - toy: {value: 3}\n  - toy: {value: 40, source: '@0'}\n")
    assert (run_pipeline(resolve_pipeline(recipe)) / "v.txt").read_text() == "43" and calls == [2, 40, 3, 40]
