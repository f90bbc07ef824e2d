"""The app's form: what it offers (methods, seeds, fitness) and the specs it writes from the fields' values.

Specs are in the CLI's YAML schema: `static_spec` for `hf-m2n2 merge`, `evolve_spec` (with `lm_eval_section`) for
`hf-m2n2 evolve`. A value the visitor typed wrong raises `gr.Error`, which Gradio shows as a toast.
"""

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import gradio as gr
import yaml

SPECIALISTS = "Bundled tiny specialists (add, rev)"
HUB = "Hub models"
DEMO_TASKS = "Demo tasks (add, rev)"
LM_EVAL = "lm-eval tasks"
EVOLVE_ALGORITHMS = {
    "m2n2": "M2N2 (evolve)",
    "ga": "GA baseline: M2N2 without competition or attraction (evolve)",
    "map_elites": "MAP-Elites baseline (evolve)",
    "sweep": "SLERP sweep between two seeds, baseline (evolve)",
}
HIDDEN_METHODS = ("passthrough",)  # layer stacking needs slices, which this form does not offer
EXTRA_PARAMS_HELP = (
    "e.g. `normalize: false` or `lambda: 1.2` (the method's global parameters, mergekit's schema)"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


# ---------------------------------------------------------------------- the form's fields


@dataclass(frozen=True)
class Field:
    """One input of the run form, declared once: `ui.build_demo` places its component, and the run callback
    receives its value under `name` (also the parameter name of the `/run` API endpoint).

    Attributes:
        name: the value's key (e.g. `budget`).
        default: the component's initial value (and the API's default).
        make: builds the component (label, limits, element id) given `value=default`.
    """

    name: str
    default: Any
    make: Callable[..., Any]

    def build(self, **overrides: Any) -> Any:
        """The Gradio component, holding the default value (`overrides`: more component arguments)."""
        return self.make(value=self.default, **overrides)


def _method_dropdown(**kwargs: Any) -> Any:
    return gr.Dropdown(method_choices(), label="Method", elem_id="method", **kwargs)  # choices: at build time


FIELDS: tuple[Field, ...] = (
    Field("source", SPECIALISTS, partial(gr.Radio, [SPECIALISTS, HUB], label="Seeds", elem_id="seed-source")),
    Field(
        "hub_ids",
        "",
        partial(
            gr.Textbox,
            label="Hub model ids (one per line, org/name or org/name@revision)",
            lines=3,
            visible=False,
            elem_id="hub-ids",
        ),
    ),
    Field(
        "base_id",
        "",
        partial(
            gr.Textbox,
            label="Base model (static methods that need one; Hub id)",
            visible=False,
            elem_id="base-model",
        ),
    ),
    Field("method", "m2n2", _method_dropdown),
    # evolutions
    Field(
        "budget", 20, partial(gr.Slider, 4, 500, step=1, label="Budget (forward passes)", elem_id="budget")
    ),
    Field("seed", 42, partial(gr.Number, precision=0, label="Random seed", elem_id="seed")),
    Field("archive", 20, partial(gr.Number, precision=0, minimum=2, label="Archive size", elem_id="archive")),
    # static merges
    Field(
        "weights",
        "0.5, 0.5",
        partial(gr.Textbox, label="Weights (one per model, or one for all)", elem_id="weights"),
    ),
    Field("density", 0.5, partial(gr.Slider, 0, 1, step=0.01, label="Density", elem_id="density")),
    Field("t", 0.5, partial(gr.Slider, 0, 1, step=0.01, label="t (slerp)", elem_id="t")),
    Field(
        "extra",
        "",
        partial(gr.Textbox, label="More parameters (YAML)", info=EXTRA_PARAMS_HELP, elem_id="extra"),
    ),
    Field(
        "score_static",
        True,
        partial(gr.Checkbox, label="Score the seeds and the merge", elem_id="score-static"),
    ),
    # fitness
    Field(
        "fitness", DEMO_TASKS, partial(gr.Radio, [DEMO_TASKS, LM_EVAL], label="Fitness", elem_id="fitness")
    ),
    Field("tasks", "gsm8k", partial(gr.Textbox, label="lm-eval tasks (comma-separated)", elem_id="tasks")),
    Field("test_tasks", "", partial(gr.Textbox, label="Held-out tasks (optional)", elem_id="test-tasks")),
    Field("metric", "exact_match", partial(gr.Textbox, label="Metric", elem_id="metric")),
    Field(
        "limit",
        50,
        partial(gr.Number, precision=0, minimum=1, label="Examples per task", elem_id="limit"),
    ),
    Field("split", "", partial(gr.Textbox, label="Fitness split (optional)", elem_id="split")),
    Field("test_split", "", partial(gr.Textbox, label="Held-out split (optional)", elem_id="test-split")),
    # last, so that positional calls of the /run endpoint written before it keep working
    Field(
        "trust_remote_code",
        False,
        partial(
            gr.Checkbox,
            label="Trust the seeds' custom code (auto_map: their Python files run)",
            elem_id="trust-remote-code",
        ),
    ),
)
"""The run form's fields, in the order of the `/run` endpoint's parameters (the page's order)."""
FIELD = {f.name: f for f in FIELDS}


# ---------------------------------------------------------------------- specs (the CLI's YAML schema)


def static_methods() -> dict[str, Any]:
    """The registered merge methods offered by the form (name -> MergeMethod)."""
    from hf_m2n2.methods import all_methods

    return {m.name: m for m in sorted(all_methods(), key=lambda m: m.name) if m.name not in HIDDEN_METHODS}


def method_choices() -> list[tuple[str, str]]:
    """(label, value) pairs of the method dropdown: the evolution algorithms, then the static methods."""
    return list((label, name) for name, label in EVOLVE_ALGORITHMS.items()) + [
        (f"{name} (static merge)", name) for name in static_methods()
    ]


def method_help(method: str) -> str:
    """Markdown describing a method and the parameters it takes."""
    if method in EVOLVE_ALGORITHMS:
        text = {
            "m2n2": "M2N2 (Model Merging of Natural Niches): an archive of merges, split-point SLERP crossover, "
            "competition for per-example resources and attraction between complementary models.",
            "ga": "M2N2's crossover without resource competition (alpha 0) and without attraction.",
            "map_elites": "MAP-Elites over the mean score of each task, with M2N2's crossover.",
            "sweep": "SLERP between the two seeds at `budget` evenly spaced points; the best one wins.",
        }[method]
        return f"**{EVOLVE_ALGORITHMS[method]}.** {text} Budget = candidates evaluated (seeds included)."
    from hf_m2n2.methods import REQUIRED

    spec = static_methods()[method]
    params = ", ".join(
        f"`{p.name}`{' per model' if p.per_model else ''}"
        + (" (required)" if p.default is REQUIRED else "" if p.default is None else f" = {p.default}")
        for p in spec.params
    )
    base = {"required": "needs a base model", "optional": "base model optional", "never": "no base model"}
    paper = f" Paper: {spec.paper}." if spec.paper else ""
    return (
        f"**{spec.name}** ({base[spec.uses_base]}): {spec.description}{paper} Parameters: {params or 'none'}."
    )


def _parse_numbers(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in re.split(r"[,\s]+", text.strip()) if x]
    except ValueError:
        raise gr.Error(f"{what}: expected numbers separated by commas, got {text!r}") from None


def _parse_list(text: str) -> list[str]:
    return [x for x in re.split(r"[,\s]+", text or "") if x]


def static_spec(
    method: str,
    models: Sequence[str],
    base_model: str | None,
    *,
    weights: str = "",
    density: float = 0.5,
    t: float = 0.5,
    extra: str = "",
) -> dict[str, Any]:
    """A mergekit-style merge spec for `hf-m2n2 merge`.

    Args:
        method: a registered merge method.
        models: the seeds (directories or Hub ids).
        base_model: the base model (None: none, or the first seed for `slerp`).
        weights: per-model `weight`, comma-separated (one number is used for every model).
        density: per-model `density` (methods that sparsify).
        t: global `t` (slerp).
        extra: YAML mapping of further global parameters.

    Returns:
        The spec mapping (`merge_method`, `base_model`, `models`, `parameters`).

    Raises:
        gr.Error: a value the user typed is malformed.
    """
    spec = static_methods()[method]
    declared = {p.name: p for p in spec.params}
    if spec.uses_base == "required" and not base_model:
        if method != "slerp":
            raise gr.Error(f"{method} needs a base model")
        base_model = models[0]
    if spec.uses_base == "never":
        base_model = None
    members = list(models)
    if base_model and method == "slerp" and base_model not in members:
        members.insert(0, base_model)
    per_model: list[dict[str, Any]] = [{} for _ in members]
    if "weight" in declared:
        values = _parse_numbers(weights or "1", "weights")
        if len(values) == 1:
            values = values * len(members)
        others = [m for m in members if m != base_model] if method != "slerp" else members
        if len(values) not in (len(members), len(others)):
            raise gr.Error(f"weights: {len(values)} numbers for {len(others)} models")
        targets = members if len(values) == len(members) else others
        for ref, value in zip(targets, values):
            per_model[members.index(ref)]["weight"] = value
    if "density" in declared:
        for entry, ref in zip(per_model, members):
            if ref != base_model:
                entry["density"] = float(density)
    parameters: dict[str, Any] = {}
    if "t" in declared:
        parameters["t"] = float(t)
    if extra and extra.strip():
        try:
            more = yaml.safe_load(extra)
        except yaml.YAMLError as exc:
            raise gr.Error(f"extra parameters: not YAML ({exc.__class__.__name__})") from None
        if not isinstance(more, dict):
            raise gr.Error("extra parameters: expected a YAML mapping such as `normalize: false`")
        parameters.update(more)
    out: dict[str, Any] = {"merge_method": method}
    if base_model:
        out["base_model"] = base_model
    out["models"] = [{"model": ref, **({"parameters": p} if p else {})} for ref, p in zip(members, per_model)]
    if parameters:
        out["parameters"] = parameters
    return out


def lm_eval_section(
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    test_tasks: Sequence[str] = (),
    metric: str = "exact_match",
    limit: int | None = None,
    split: str | None = None,
    test_split: str | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """The `evaluate:` section (`kind: lm_eval`) of a spec."""
    if not tasks:
        raise gr.Error("fitness: give at least one lm-eval task")
    section: dict[str, Any] = {"kind": "lm_eval", "tasks": list(tasks)}
    if include_path:
        section["include_path"] = include_path
    if test_tasks:
        section["test_tasks"] = list(test_tasks)
    if limit:
        section["limit"] = int(limit)
    if split:
        section["split"] = split
    if test_split:
        section["test_split"] = test_split
    section["metric"] = metric or "exact_match"
    section["batch_size"] = int(batch_size)
    return section


def evolve_spec(
    algorithm: str,
    models: Sequence[str],
    evaluate: dict[str, Any],
    *,
    budget: int,
    seed: int = 42,
    archive_size: int = 20,
    block_size: int = 65536,
    name: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """An evolve spec for `hf-m2n2 evolve` (Blend genomes over the seeds, checkpointed every pass); with
    `trust_remote_code`, the seeds' own code may run (the spec's `trust_remote_code: true`)."""
    if algorithm == "sweep" and len(models) != 2:
        raise gr.Error("the SLERP sweep needs exactly two seeds")
    evolve: dict[str, Any] = {
        "algorithm": algorithm,
        "budget": int(budget),
        "seed": int(seed),
        "log_every": max(1, int(budget) // 10),
        "checkpoint_every_steps": 1,  # flushes history and lineage every pass: the plot follows live
    }
    if algorithm != "sweep":
        evolve["archive_size"] = int(archive_size)
    spec = {
        "name": name or f"{algorithm}-merge",
        "models": [{"model": ref} for ref in models],
        "genome": {"kind": "blend", "block_size": int(block_size), "slerp_scope": "global"},
        "evolve": evolve,
        "evaluate": evaluate,
    }
    return {**spec, "trust_remote_code": True} if trust_remote_code else spec


def _evaluate(values: dict[str, Any], built: Any) -> dict[str, Any]:
    if values["fitness"] == DEMO_TASKS:
        if built is None:  # Hub seeds scored on the demo tasks: the tasks come with the specialists build
            raise gr.Error(
                "the demo tasks come with the bundled specialists; choose lm-eval tasks for Hub models"
            )
        return lm_eval_section(
            built.fitness_tasks,
            include_path="tasks",  # linked into the run directory, next to the spec
            test_tasks=built.test_tasks,
            metric="exact_match",
            batch_size=64,
        )
    limit = int(values["limit"]) if values["limit"] else None
    return lm_eval_section(
        _parse_list(values["tasks"]),
        test_tasks=_parse_list(values["test_tasks"]),
        metric=(values["metric"] or "exact_match").strip(),
        limit=limit,
        split=(values["split"] or "").strip() or None,
        test_split=(values["test_split"] or "").strip() or None,
    )
