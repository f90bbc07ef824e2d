"""evomerge_ps: CMA-ES over merge-method parameters per model and layer group (Akiba et al.), materialized with the
functions of `hf-m2n2 merge`, exported as a merge spec that `hf-m2n2 merge` reproduces bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from helpers import load_dir, sigkill_evolve, write_yaml
from test_evolve_loop import _assert_same_archive, _comparable
from test_evolve_models import LIKELIHOOD_EVALUATE

from hf_m2n2.errors import HfM2n2Error, SpecError
from hf_m2n2.evolve.build import build_run
from hf_m2n2.evolve.checkpoint import load_state, pack, unpack
from hf_m2n2.evolve.evomerge_ps import EvomergePS, default_popsize
from hf_m2n2.evolve.loop import load_archive
from hf_m2n2.evolve.runs import start_runs
from hf_m2n2.evolve.spec import parse_evolve_spec
from hf_m2n2.genomes.method import layer_groups
from hf_m2n2.merge import MergeOptions, merge
from hf_m2n2.spec import parse_spec

torch.set_num_threads(1)


def _spec(seeds, genome=None, **evolve) -> dict:
    return {
        "name": "tiny-evomerge",
        "models": [{"model": str(seeds["a"])}, {"model": str(seeds["b"])}],
        "genome": genome
        or {
            "kind": "method",
            "method": "dare_ties",
            "base_model": str(seeds["base"]),
            "parameters": ["weight", "density"],
        },
        "evolve": {
            "algorithm": "evomerge_ps",
            "budget": 14,
            "seed": 5,
            "log_every": 2,
            "checkpoint_every_steps": 1,
            **evolve,
        },
        "evaluate": LIKELIHOOD_EVALUATE,
    }


@pytest.fixture(scope="module")
def finished_run(seeds, tmp_path_factory):
    root = tmp_path_factory.mktemp("evomerge_ps")
    start_runs(write_yaml(root / "spec.yaml", _spec(seeds)), root / "run", progress=False)
    return root / "run"


# --- the strategy ---------------------------------------------------------------------------------------------


class _VectorOps:
    kind = "method"

    def __init__(self, size: int):
        self.size = size

    def from_array(self, values):
        return np.array(values, dtype=np.float64)

    def to_state(self, x):
        return x

    def from_state(self, state):
        return np.asarray(state, dtype=np.float64)


def _quadratic(x: np.ndarray) -> np.ndarray:
    return np.array([1.0 - np.sum((x - 0.8) ** 2), 1.0 - abs(x[0] - 1.0)])


def _drive(strategy: EvomergePS, steps: int) -> list[np.ndarray]:
    asked = []
    for _ in range(steps):
        candidate = strategy.ask()
        asked.append(candidate.genome)
        strategy.tell(candidate, _quadratic(candidate.genome))
    return asked


def _roundtrip(state: dict) -> dict:
    """Through the checkpoint's JSON + arrays encoding (no pickle anywhere)."""
    tree, arrays = pack(state)
    assert all(a.dtype != object for a in arrays.values())
    return unpack(json.loads(json.dumps(tree)), arrays)


@pytest.mark.parametrize("n, popsize", [(1, 4), (2, 6), (8, 10), (20, 12), (100, 17), (1000, 24)])
def test_popsize_is_4_plus_floor_3_ln_n(n, popsize):
    assert default_popsize(n) == popsize == 4 + int(np.floor(3 * np.log(n)))
    assert EvomergePS(_VectorOps(n)).popsize == popsize


def test_paper_settings_and_bounds():
    strategy = EvomergePS(_VectorOps(6), rng_seed=1)
    assert strategy.sigma0 == pytest.approx(1 / 6) and np.all(strategy.es.mean == 0.5)
    asked = _drive(strategy, 20 * strategy.popsize)
    assert all(np.all((g >= 0) & (g <= 1)) for g in asked)  # samples outside are projected (repair)
    assert any(np.any((g == 0) | (g == 1)) for g in asked)
    assert strategy.best().mean_score > 0.97  # optimum 1.0 at x = 0.8 (first score) and x0 = 1 (second)


def test_checkpoint_is_explicit_and_replays_exactly_mid_generation():
    straight = EvomergePS(_VectorOps(5), rng_seed=np.random.SeedSequence(9))
    tail = _drive(straight, 53)[30:]
    first = EvomergePS(_VectorOps(5), rng_seed=np.random.SeedSequence(9))
    _drive(first, 30)  # popsize 8: 3 generations, then 6 samples of the 4th
    state = _roundtrip(first.state_dict())
    assert state["told"].shape == (3, 8) and state["solutions"].shape == (8, 5) and len(state["fvalues"]) == 6
    assert state["cma"]["C"].shape == (5, 5) and state["cma"]["countiter"] == 3
    resumed = EvomergePS(_VectorOps(5), rng_seed=np.random.SeedSequence(9))
    resumed.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(_drive(resumed, 23), tail))
    for key, value in straight.cma_state().items():
        assert (
            np.array_equal(np.asarray(value), np.asarray(resumed.cma_state()[key]))
            or value == resumed.cma_state()[key]
        )
    assert np.array_equal(straight.best().genome, resumed.best().genome)


def test_a_checkpoint_that_does_not_replay_is_refused():
    strategy = EvomergePS(_VectorOps(4), rng_seed=2)
    _drive(strategy, 17)
    state = _roundtrip(strategy.state_dict())
    state["cma"]["sigma"] *= 1.5
    with pytest.raises(HfM2n2Error, match=r"did not reproduce its state.*\(sigma\)"):
        EvomergePS(_VectorOps(4), rng_seed=2).load_state_dict(state)
    with pytest.raises(HfM2n2Error, match="other evomerge_ps settings or another seed"):
        EvomergePS(_VectorOps(4), rng_seed=3).load_state_dict(_roundtrip(strategy.state_dict()))


def test_layer_groups_are_contiguous_and_cover_every_layer():
    assert layer_groups(2, None) == ((0, 1), (1, 2))
    assert layer_groups(7, 3) == ((0, 2), (2, 5), (5, 7))
    with pytest.raises(SpecError, match="genome.layer_groups: 3 groups for 2 layers"):
        layer_groups(2, 3)


# --- genome -> recipe -> live weights == hf-m2n2 merge of the exported YAML ----------------------------------------


@pytest.mark.parametrize(
    "genome",
    [
        {"method": "dare_ties", "parameters": ["weight", "density"]},
        {"method": "ties", "parameters": ["weight", "density"], "layer_groups": 1},
        {"method": "dare_linear", "parameters": ["density"], "method_parameters": {"weight": 0.7}},
        {"method": "task_arithmetic", "parameters": ["weight"], "method_parameters": {"lambda": 0.9}},
        {"method": "linear", "parameters": ["weight"]},
    ],
    ids=lambda g: g["method"],
)
def test_live_weights_equal_hf_m2n2_merge_of_the_recipe(seeds, tmp_path, cli, genome):
    genome = {"kind": "method", **genome}
    if genome["method"] != "linear":
        genome["base_model"] = str(seeds["base"])
    spec = parse_evolve_spec(_spec(seeds, genome))
    parts = build_run(spec, 0, tmp_path, None)
    ops, target = parts.ops, parts.target
    x = np.random.default_rng(0).uniform(0, 1, ops.size)
    x[0] = 1.0
    target.write(ops.from_array(x))
    live = {n: t.detach().clone() for n, t in target.live.model.state_dict().items()}

    config = ops.merge_config(x)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    code, _, err = cli("merge", path, tmp_path / "merged", "--quiet")
    assert code == 0, err
    merged = load_dir(tmp_path / "merged")
    assert set(merged) <= set(live)
    for name, tensor in merged.items():
        assert torch.equal(live[name], tensor), name
    seed_a = load_dir(seeds["a"])
    assert any(not torch.equal(merged[n], seed_a[n]) for n in merged)

    # big tensors: row blocks (and streamed statistics for TIES/DARE), as merge computes them
    options = MergeOptions(chunk_elements=2000, progress=False)
    target.merge_options = options
    target.write(ops.from_array(np.roll(x, 1)))
    live = {n: t.detach().clone() for n, t in target.live.model.state_dict().items()}
    merge(parse_spec(ops.merge_config(np.roll(x, 1))), tmp_path / "blocks", options)
    for name, tensor in load_dir(tmp_path / "blocks").items():
        assert torch.equal(live[name], tensor), name


def test_run_exports_the_merge_of_its_yaml_bit_for_bit(finished_run, seeds, cli, tmp_path):
    model = finished_run / "model"
    text = (model / "merge_config.yaml").read_text()
    assert text.startswith("# tiny-evomerge: evolved by hf-m2n2 evomerge_ps")
    config = yaml.safe_load(text)
    assert config["merge_method"] == "dare_ties" and len(config["slices"]) == 2
    assert config["slices"][0]["sources"][0]["layer_range"] == [0, 1]

    code, _, err = cli("merge", model / "merge_config.yaml", tmp_path / "again", "--quiet")
    assert code == 0, err
    exported = (model / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == exported

    # the exported weights are those that were evaluated: the best genome written into the live model
    archive = load_archive(finished_run)
    best = archive["members"][archive["best"]]["genome"]
    spec = parse_evolve_spec(yaml.safe_load((finished_run / "spec.yaml").read_text()))
    parts = build_run(spec, 5, tmp_path / "live", None)
    parts.target.write(parts.ops.from_state(best))
    live = parts.target.live.model.state_dict()
    for name, tensor in load_dir(model).items():
        assert torch.equal(live[name], tensor), name
    assert parts.ops.merge_config(parts.ops.from_state(best)) == config

    code, _, err = cli("export", finished_run, tmp_path / "exported", "--quiet")
    assert code == 0, err
    assert (tmp_path / "exported" / "model.safetensors").read_bytes() == exported
    assert "hf-m2n2 merge merge_config.yaml" in (tmp_path / "exported" / "README.md").read_text()


def test_run_report_summary_and_card(finished_run):
    report = json.loads((finished_run / "report.json").read_text())
    assert set(report) == {"ft-a", "ft-b", "base", "tiny-evomerge"}
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["forward_passes"] == 14 and summary["algorithm"] == "evomerge_ps"
    assert summary["best_candidate"]["origin"] == "cma"
    checkpoint = load_state(finished_run / "checkpoint.npz")["strategy"]
    assert checkpoint["settings"]["popsize"] == default_popsize(8) == 10  # 2 models x 2 layers x 2 parameters
    readme = (finished_run / "model" / "README.md").read_text()
    assert "evomerge_ps" in readme and "2403.13187" in readme


# --- resume --------------------------------------------------------------------------------------------------


def test_sigkill_then_resume_equals_an_uninterrupted_run(seeds, tmp_path, cli):
    spec = write_yaml(tmp_path / "spec.yaml", _spec(seeds, budget=30, log_every=5))
    killed = tmp_path / "killed"
    at_kill = sigkill_evolve(spec, killed, min_passes=12, timeout=120, fresh_interpreter=False)  # mid gen. 2
    assert 12 <= at_kill < 30

    code, _, err = cli("evolve", "--resume", killed, "-q")
    assert code == 0, err
    code, _, err = cli("evolve", spec, "--out", tmp_path / "straight", "-q")
    assert code == 0, err
    straight = tmp_path / "straight"
    resumed = json.loads((killed / "summary.json").read_text())
    assert resumed["timing"]["sessions"] == 2
    assert _comparable(resumed) == _comparable(json.loads((straight / "summary.json").read_text()))
    assert (killed / "history.jsonl").read_bytes() == (straight / "history.jsonl").read_bytes()
    assert (killed / "lineage.jsonl").read_bytes() == (straight / "lineage.jsonl").read_bytes()
    _assert_same_archive(killed, straight)
    for name in ("model.safetensors", "merge_config.yaml"):
        assert (killed / "model" / name).read_bytes() == (straight / "model" / name).read_bytes()


# --- spec errors ---------------------------------------------------------------------------------------------


def _genome_error(seeds, change: dict, evolve: dict | None = None) -> str:
    spec = _spec(seeds)
    spec["genome"] = {**spec["genome"], **change}
    spec["genome"] = {k: v for k, v in spec["genome"].items() if v is not None}
    spec["evolve"] = {**spec["evolve"], **(evolve or {})}
    with pytest.raises(SpecError) as info:
        parse_evolve_spec(spec)
    return str(info.value)


@pytest.mark.parametrize(
    "change, evolve, message",
    [
        ({"method": "nope"}, None, "genome.method: unknown merge method 'nope'"),
        (
            {"parameters": ["weight", "gamma"]},
            None,
            "genome.parameters[1]: 'gamma' is not a per-model parameter",
        ),
        ({"parameters": ["weight", "weight"]}, None, "genome.parameters[1]: 'weight' is listed twice"),
        ({"parameters": []}, None, "genome.parameters: List should have at least 1 item"),
        ({"parameters": ["density"]}, None, "genome.parameters: weight is required by dare_ties"),
        ({"base_model": None}, None, "genome.base_model: required by dare_ties"),
        ({"method": "linear", "parameters": ["weight"]}, None, "genome.base_model: not used by linear"),
        (
            {"method_parameters": {"lambda": 1, "bogus": 2}},
            None,
            "genome.method_parameters.bogus: not a parameter",
        ),
        ({"method_parameters": {"weight": 1}}, None, "genome.method_parameters.weight: is evolved"),
        ({"layer_groups": 0}, None, "genome.layer_groups: Input should be greater than or equal to 1"),
        ({"block_size": 1024}, None, "genome.block_size: unknown key"),
        (
            {},
            {"algorithm": "m2n2"},
            "genome.kind: m2n2 evolves genomes by crossover: use genome: {kind: blend",
        ),
        ({}, {"evomerge_ps": {"sigma0": 0}}, "evolve.evomerge_ps.sigma0: Input should be greater than 0"),
        ({}, {"evomerge_ps": {"x0": 2}}, "evolve.evomerge_ps.x0: Input should be less than or equal to 1"),
        (
            {},
            {"evomerge_ps": {"popsize": 1}},
            "evolve.evomerge_ps.popsize: Input should be greater than or equal to 2",
        ),
    ],
)
def test_spec_errors_name_the_yaml_path(seeds, change, evolve, message):
    assert _genome_error(seeds, change, evolve).startswith(message)


def test_algorithm_and_genome_must_match(seeds, write_spec):
    spec = _spec(seeds)
    spec["genome"]["base_model"] = str(seeds["a"])
    with pytest.raises(SpecError, match="genome.base_model: is one of the models"):
        parse_evolve_spec(spec)
    blend = {**_spec(seeds), "genome": {"kind": "blend"}}
    with pytest.raises(SpecError, match=r"genome.kind: evomerge_ps evolves merge-method parameters"):
        parse_evolve_spec(blend)
    m2n2 = {
        **_spec(seeds),
        "genome": {"kind": "blend"},
        "evolve": {"algorithm": "m2n2", "budget": 4, "evomerge_ps": {}},
    }
    with pytest.raises(SpecError, match="evolve.evomerge_ps: not used by m2n2"):
        parse_evolve_spec(m2n2)
    dense = {
        "genome": {"kind": "dense", "size": 10},
        "evolve": {"algorithm": "evomerge_ps", "budget": 4},
        "evaluate": {"kind": "python", "callable": "hf_m2n2.demo.tasks.digits:train_scores"},
    }
    with pytest.raises(SpecError, match="evolve.algorithm: evomerge_ps evolves merge-method parameters"):
        parse_evolve_spec(dense)
    parse_evolve_spec(
        {**_spec(seeds), "genome": {"block_size": 1024}, "evolve": {"algorithm": "m2n2", "budget": 4}}
    )


def test_too_many_layer_groups_fail_before_the_first_candidate(seeds, tmp_path):
    spec = _spec(seeds)
    spec["genome"]["layer_groups"] = 3
    with pytest.raises(SpecError, match="genome.layer_groups: 3 groups for 2 layers"):
        start_runs(write_yaml(tmp_path / "spec.yaml", spec), tmp_path / "run", progress=False)
