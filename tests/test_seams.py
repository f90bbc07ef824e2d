"""The house's seams hold: no import circle in the package, genome kinds dispatched by their registry only, and
each registry accepts a new kind as one new registration."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import yaml

import hf_m2n2
from hf_m2n2.errors import SpecError

PACKAGE = Path(hf_m2n2.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every hf_m2n2 module `path` imports, at module level or inside functions (not for type checking only)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for inner in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_no_import_circle_in_the_package():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    # a package's __init__ re-exporting its own submodules is not a circle of the design
    for name in graph:
        graph[name] = {
            t for t in graph[name] if not (modules[name].name == "__init__.py" and t.startswith(name))
        }
    assert _cycles(graph) == []


def test_genome_kinds_are_dispatched_by_their_registry_only():
    from hf_m2n2.genomes import genome_kinds

    kind_classes = {kind.config.__name__ for kind in genome_kinds().values()}
    kind_classes |= {"DenseVectorOps", "BlendOps", "MethodOps", "BlendTarget", "MethodTarget", "DenseTarget"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "genomes":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "hasattr"):
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                text = ast.unparse(node)
                if names & kind_classes or "ops" in ast.unparse(node.args[0]) or ".genome" in text:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {text}")
    assert offenders == []


def test_a_new_genome_kind_is_one_registration(tmp_path):
    """A kind registered from outside the package gets its own `genome:` section, algorithm check and run."""
    from typing import Literal

    from hf_m2n2.evolve.runs import start_runs
    from hf_m2n2.evolve.spec import parse_evolve_spec
    from hf_m2n2.genomes import GenomeKind, GenomeRun, register_genome_kind
    from hf_m2n2.genomes.base import GENOME_KINDS
    from hf_m2n2.genomes.dense import DenseTarget, DenseVectorOps
    from hf_m2n2.spec import StrictModel

    class ConstantConfig(StrictModel):
        kind: Literal["constant"]
        value: float

    class ConstantKind(GenomeKind):
        name = "constant"
        config = ConstantConfig
        algorithms = ("sweep",)

        def build(self, spec, rng, run_dir, spec_dir):
            ops = DenseVectorOps(3)
            start = [np.full(3, spec.genome.value, np.float32), np.zeros(3, np.float32)]
            return GenomeRun(ops, DenseTarget(), start)

    register_genome_kind(ConstantKind())
    try:
        spec = {
            "genome": {"kind": "constant", "value": 1.0},
            "evolve": {"algorithm": "sweep", "budget": 3, "log_every": 1},
            "evaluate": {"kind": "python", "callable": "torch:abs"},
        }
        assert parse_evolve_spec(spec).genome.value == 1.0
        with pytest.raises(
            SpecError, match="evolve.algorithm: a constant genome is evolved by sweep, not m2n2"
        ):
            parse_evolve_spec({**spec, "evolve": {"algorithm": "m2n2", "budget": 3}})
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
        [summary] = start_runs(tmp_path / "spec.yaml", tmp_path / "run", progress=False)
        assert summary["best_train"] == 1.0  # w = 0: the constant seed itself, |1| per example
    finally:
        GENOME_KINDS.remove("constant")


def test_an_evaluate_list_concatenates_its_parts_with_weights(tmp_path):
    from hf_m2n2.evolve.runs import start_runs
    from hf_m2n2.evolve.spec import parse_evolve_spec

    spec = {
        "genome": {"kind": "dense", "size": 4, "seeds": {"kind": "random", "count": 2}},
        "evolve": {"algorithm": "sweep", "budget": 2, "log_every": 1},
        "evaluate": [
            {"kind": "python", "callable": "torch:abs"},
            {"kind": "python", "callable": "torch:square", "weight": 2},
        ],
    }
    parsed = parse_evolve_spec(spec)
    assert [p.weight for p in parsed.evaluate] == [1, 2]
    with pytest.raises(SpecError, match=r"evaluate\[1\]\.weight: Input should be greater than or equal to 1"):
        parse_evolve_spec({**spec, "evaluate": [spec["evaluate"][0], {**spec["evaluate"][1], "weight": 0}]})
    with pytest.raises(SpecError, match="evaluate.weight: weights apply to parts of a list"):
        parse_evolve_spec({**spec, "evaluate": {**spec["evaluate"][0], "weight": 2}})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    start_runs(tmp_path / "spec.yaml", tmp_path / "run", progress=False)
    from hf_m2n2.evolve.loop import load_archive

    member = load_archive(tmp_path / "run")["members"][0]
    genome = np.abs(member["genome"].astype(np.float64))
    expected = np.concatenate([genome, genome**2, genome**2])
    np.testing.assert_allclose(member["scores"], expected, rtol=1e-6)


def test_a_new_evaluator_kind_is_one_registration(tmp_path):
    """An evaluator registered from outside the package is an `evaluate:` part like the built-in ones."""
    from typing import Literal

    from hf_m2n2.evaluate import EvaluatorConfig, Report, register_evaluator
    from hf_m2n2.evaluate.base import EVALUATOR_KINDS
    from hf_m2n2.evolve.runs import start_runs

    class CountConfig(EvaluatorConfig):
        kind: Literal["count_positive"]

    class CountPositive:
        def scores(self, model):
            return (model > 0).numpy().astype(np.float64)

        def test_score(self, model):
            return None

        def example_groups(self):
            return None

        def report(self, model):
            return Report({"positive": float(self.scores(model).mean())})

    register_evaluator("count_positive", CountConfig, lambda config, context: CountPositive())
    try:
        spec = {
            "genome": {"kind": "dense", "size": 5, "seeds": {"kind": "random", "count": 2}},
            "evolve": {"algorithm": "sweep", "budget": 2, "log_every": 1},
            "evaluate": [{"kind": "count_positive"}, {"kind": "python", "callable": "torch:abs"}],
        }
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
        [summary] = start_runs(tmp_path / "spec.yaml", tmp_path / "run", progress=False)
        assert summary["forward_passes"] == 2 and summary["failures"] == 0
        from hf_m2n2.evolve.loop import load_archive

        [member] = load_archive(tmp_path / "run")["members"]
        genome = member["genome"].astype(np.float64)
        np.testing.assert_allclose(member["scores"], np.concatenate([genome > 0, np.abs(genome)]), rtol=1e-6)
    finally:
        EVALUATOR_KINDS.remove("count_positive")
