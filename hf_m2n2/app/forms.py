"""The app's forms: what they offer (methods, seeds, fitness) and the specs they write from the fields' values.

Two forms: language models (`FIELDS`: static merges and evolutions, lm-eval fitness, optionally with an agent
fitness on WebShop) and text-to-image pipelines (`T2I_FIELDS`: evolutions with a CLIP fitness). Specs are in the
CLI's YAML schema: `static_spec` for `hf-m2n2 merge`, `evolve_spec` (with `lm_eval_section`, a list of it and a
`webshop_section`, or `clip_section`) for `hf-m2n2 evolve`. A value the visitor typed wrong raises `gr.Error`,
which Gradio shows as a toast.
"""

import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
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
WEBSHOP_SERVER_HELP = (
    "an AgentGym WebShop env server (agentenv-webshop) the evolution's models shop on: their rewards join the "
    "lm-eval scores in the fitness (evolutions only)"
)
WEBSHOP_TEST_HELP = (
    "the score table's sessions, e.g. `20-39` or AgentEval's `hf://datasets/AgentGym/AgentEval@main/webshop_test.json`;"
    " blank: the fitness sessions"
)
WEBSHOP_PART = "evaluate[1]"  # the agent fitness is the second part of the evaluate list
T2I_BUNDLED = "Bundled tiny text-to-image specialists (en, ja)"
T2I_HUB = "Hub pipelines"
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
    # the agent fitness (evolutions): after the fields above, for the same reason
    Field(
        "webshop_server",
        "",
        partial(
            gr.Textbox,
            label="WebShop server (blank: no agent fitness)",
            info=WEBSHOP_SERVER_HELP,
            placeholder="http://your-host:36001",
            elem_id="webshop-server",
        ),
    ),
    Field(
        "webshop_sessions",
        "",
        partial(
            gr.Textbox,
            label="Sessions (fitness)",
            info="WebShop goal ids and ranges, e.g. `0-19` or `0, 3, 5-9`",
            placeholder="0-19",
            elem_id="webshop-sessions",
        ),
    ),
    Field(
        "webshop_test_sessions",
        "",
        partial(
            gr.Textbox,
            label="Held-out sessions (optional)",
            info=WEBSHOP_TEST_HELP,
            placeholder="20-39",
            elem_id="webshop-test-sessions",
        ),
    ),
    Field(
        "webshop_max_rounds",
        10,
        partial(
            gr.Number,
            precision=0,
            minimum=1,
            label="Actions per session at most",
            elem_id="webshop-max-rounds",
        ),
    ),
    Field(
        "webshop_max_new_tokens",
        128,
        partial(
            gr.Number,
            precision=0,
            minimum=1,
            label="Tokens per reply at most",
            info="a model that never ends its reply would otherwise write up to the 4096-token conversation limit",
            elem_id="webshop-max-new-tokens",
        ),
    ),
)
"""The run form's fields, in the order of the `/run` endpoint's parameters (the page's order)."""
FIELD = {f.name: f for f in FIELDS}

PROMPT_FILE_TYPES = [".txt", ".jsonl"]
PROMPTS_HELP = (
    "blank: the bundled prompts. A file: .txt (one prompt per line) or .jsonl "
    "(id, prompt, scoring_text, group, split: the score table has one column per group)"
)

T2I_FIELDS: tuple[Field, ...] = (
    Field("source", T2I_BUNDLED, partial(gr.Radio, [T2I_BUNDLED, T2I_HUB], label="Seeds")),
    Field(
        "pipelines",
        "",
        partial(
            gr.Textbox,
            label="Text-to-image pipelines (diffusers; one per line, org/name or org/name@revision)",
            lines=3,
            visible=False,
        ),
    ),
    Field(
        "judge",
        "",
        partial(
            gr.Textbox,
            label="CLIP judge (Hub id, e.g. openai/clip-vit-base-patch32; blank: the bundled tiny judge)",
        ),
    ),
    Field(
        "prompts",
        "",
        partial(gr.Textbox, label="Fitness prompts (one per line)", info=PROMPTS_HELP, lines=4),
    ),
    Field(
        "prompts_file",
        None,
        partial(gr.File, label="... or a fitness prompts file", file_types=PROMPT_FILE_TYPES, height=120),
    ),
    Field(
        "test_prompts",
        "",
        partial(
            gr.Textbox,
            label="Held-out prompts (optional, one per line)",
            info="the score table's prompts; blank: the bundled ones with bundled prompts, else the fitness prompts",
            lines=2,
        ),
    ),
    Field(
        "test_prompts_file",
        None,
        partial(gr.File, label="... or a held-out prompts file", file_types=PROMPT_FILE_TYPES, height=120),
    ),
    Field("images_per_prompt", 1, partial(gr.Slider, 1, 8, step=1, label="Images per prompt")),
    Field("steps", 10, partial(gr.Slider, 1, 100, step=1, label="Denoising steps")),
    # text boxes, not numbers: a blank one means "the pipeline's default" (a number box shows 0)
    Field(
        "guidance",
        "",
        partial(gr.Textbox, label="Guidance scale", placeholder="blank: the pipeline's default"),
    ),
    Field(
        "size",
        "",
        partial(gr.Textbox, label="Image size in pixels", placeholder="blank: the pipeline's default"),
    ),
    Field(
        "algorithm",
        "m2n2",
        partial(gr.Dropdown, [(label, name) for name, label in EVOLVE_ALGORITHMS.items()], label="Algorithm"),
    ),
    FIELD["budget"],
    FIELD["seed"],
    FIELD["archive"],
)
"""The text-to-image form's fields, in the order of the `/run_t2i` endpoint's parameters (the page's order; the
page gives their components the element ids `t2i-<name>`)."""
T2I_FIELD = {f.name: f for f in T2I_FIELDS}


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


def clip_section(
    judge: str,
    prompts: str,
    *,
    test_prompts: str | None = None,
    images_per_prompt: int = 1,
    num_inference_steps: int = 10,
    guidance_scale: float | None = None,
    size: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """The `evaluate:` section (`kind: clip`) of a spec: per-prompt CLIP scores of the pipeline's images.

    Args:
        judge: the CLIP judge (a Hub id, or a directory relative to the spec).
        prompts: the fitness prompts file (relative to the spec).
        test_prompts: the held-out prompts file (None: the report scores the fitness prompts).
        images_per_prompt: images drawn per prompt (their scores are averaged).
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance (None: the pipeline's default).
        size: the images' height and width in pixels (None: the pipeline's default).
        batch_size: images per pipeline call.

    Returns:
        The section, valid for `hf_m2n2.evaluate.clip.ClipConfig`.

    Raises:
        gr.Error: a value out of range, on one line naming its YAML path (e.g. `evaluate.images_per_prompt`).

    Example:
        >>> clip_section("judge", "prompts.jsonl", images_per_prompt=2)["kind"]
        'clip'
    """
    from pydantic import ValidationError

    from hf_m2n2.evaluate.clip import ClipConfig
    from hf_m2n2.spec import validation_error

    section: dict[str, Any] = {"kind": "clip", "model": (judge or "").strip(), "prompts": prompts}
    if test_prompts:
        section["test_prompts"] = test_prompts
    section["images_per_prompt"] = _whole(images_per_prompt, "evaluate.images_per_prompt")
    section["num_inference_steps"] = _whole(num_inference_steps, "evaluate.num_inference_steps")
    if guidance_scale is not None:
        section["guidance_scale"] = float(guidance_scale)
    if size is not None:
        section["height"] = section["width"] = _whole(size, "evaluate.height")
    section["batch_size"] = _whole(batch_size, "evaluate.batch_size")
    try:
        ClipConfig(**section)
    except ValidationError as exc:
        raise gr.Error(str(validation_error(exc, section, prefix="evaluate", model=ClipConfig))) from None
    return section


def webshop_section(
    server: str,
    sessions: str,
    *,
    test_sessions: str = "",
    max_rounds: Any = 10,
    max_new_tokens: Any = None,
    prefix: str = WEBSHOP_PART,
) -> dict[str, Any]:
    """An agent fitness part (`kind: webshop`) from the form's text: the evolution's models play WebShop sessions
    against the visitor's env server, one reward per session.

    Args:
        server: the env server's http(s) URL (environment variables are not read: `$` is refused).
        sessions: the fitness sessions: ids and inclusive ranges separated by commas or spaces (`0-19`, `0, 3, 5-9`).
        test_sessions: the held-out sessions, the same way, or `hf://datasets/ORG/NAME@REV/FILE` lists
            (blank: the report scores the fitness sessions).
        max_rounds: actions per session at most.
        max_new_tokens: tokens per reply at most (None: up to the conversation's limit).
        prefix: the part's YAML path in the spec, for errors.

    Returns:
        The section, valid for `hf_m2n2.evaluate.webshop.WebshopConfig`.

    Raises:
        gr.Error: a malformed value, on one line naming its YAML path (e.g. `evaluate[1].sessions`).

    Example:
        >>> webshop_section("http://127.0.0.1:36001", "0-19", max_rounds=6)["sessions"]
        ['0-19']
    """
    from pydantic import ValidationError

    from hf_m2n2.evaluate.webshop import WebshopConfig
    from hf_m2n2.spec import validation_error

    url = (server or "").strip()
    if "$" in url:  # the CLI expands ${NAME} from the environment: a visitor must not read the server's
        raise gr.Error(f"{prefix}.server: environment variables are not read here, got {url!r}")
    section: dict[str, Any] = {
        "kind": "webshop",
        "server": url,
        "sessions": _sessions(sessions, f"{prefix}.sessions"),
    }
    if (test_sessions or "").strip():
        section["test_sessions"] = _sessions(test_sessions, f"{prefix}.test_sessions", files=True)
    section["max_rounds"] = _whole(max_rounds, f"{prefix}.max_rounds")
    if max_new_tokens is not None:
        tokens = _whole(max_new_tokens, f"{prefix}.gen_kwargs.max_new_tokens")
        if tokens < 1:
            raise gr.Error(f"{prefix}.gen_kwargs.max_new_tokens: expected at least 1, got {tokens}")
        section["gen_kwargs"] = {"max_new_tokens": tokens}
    try:
        WebshopConfig(**section)
    except ValidationError as exc:
        raise gr.Error(str(validation_error(exc, section, prefix=prefix, model=WebshopConfig))) from None
    return section


def agent_fitness(values: dict[str, Any]) -> dict[str, Any] | None:
    """The run form's agent fitness part (`webshop_section` of its WebShop fields), None when the server is blank."""
    if not (values.get("webshop_server") or "").strip():
        return None
    return webshop_section(
        values["webshop_server"],
        values.get("webshop_sessions") or "",
        test_sessions=values.get("webshop_test_sessions") or "",
        max_rounds=values.get("webshop_max_rounds", FIELD["webshop_max_rounds"].default),
        max_new_tokens=values.get("webshop_max_new_tokens", FIELD["webshop_max_new_tokens"].default),
    )


def _sessions(text: str, path: str, *, files: bool = False) -> list[int | str]:
    """Session ids (int) and `A-B` ranges (str) as typed; with `files`, hf:// dataset lists too (never a path on
    this server). Repeats and backward ranges are the config's to refuse."""
    items: list[int | str] = []
    for token in _parse_list(text):
        if token.isdigit():
            items.append(int(token))
        elif re.fullmatch(r"\d+-\d+", token) or (files and token.startswith("hf://datasets/")):
            items.append(token)
        else:
            wanted = "ids or ranges like 0-19" + (" or hf://datasets/ORG/NAME@REV/FILE" if files else "")
            raise gr.Error(f"{path}: expected session {wanted}, got {token!r}")
    if not items:
        raise gr.Error(f"{path}: give the sessions, ids or ranges like 0-19")
    return items


def optional_number(text: Any, path: str) -> float | None:
    """A number typed in a text box, None when blank.

    Raises:
        gr.Error: not a number (one line naming `path`, e.g. `evaluate.guidance_scale`).
    """
    if text is None or not str(text).strip():
        return None
    try:
        return float(str(text).strip())
    except ValueError:
        raise gr.Error(f"{path}: expected a number, got {text!r}") from None


def _whole(value: Any, path: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{path}: expected a whole number, got {value!r}") from None
    if not number.is_integer():
        raise gr.Error(f"{path}: expected a whole number, got {value!r}")
    return int(number)


def prompts_file(text: str | None, upload: str | None, directory: Path, name: str) -> str | None:
    """The prompts a visitor gave, as a file in the run `directory`: the uploaded file (kept as `.txt` or
    `.jsonl`), else the box's lines (`NAME.txt`); checked with the CLIP evaluator's own reader.

    Args:
        text: the box's value (one prompt per line).
        upload: the uploaded file's path, or None.
        directory: the run directory (the spec's folder).
        name: the file's name without suffix, also the spec key named in errors (`prompts`, `test_prompts`).

    Returns:
        The file's name relative to `directory`, or None when the box is blank and nothing was uploaded.

    Raises:
        gr.Error: both were given, the file's type is not .txt or .jsonl, or it is not a valid prompts file (one
            line naming the file's line, e.g. `evaluate.prompts: prompts.jsonl:3: not JSON (...)`).
    """
    from hf_m2n2.errors import SpecError
    from hf_m2n2.evaluate.clip import load_prompts

    field = f"evaluate.{name}"
    typed = "\n".join(line.strip() for line in (text or "").splitlines() if line.strip())
    if upload and typed:
        raise gr.Error(f"{field}: give prompts in the box or as a file, not both")
    if upload:
        suffix = Path(upload).suffix.lower()
        if suffix not in PROMPT_FILE_TYPES:
            raise gr.Error(f"{field}: expected a .txt or .jsonl file, got {Path(upload).name!r}")
        target = directory / f"{name}{suffix}"
        shutil.copyfile(upload, target)
    elif typed:
        target = directory / f"{name}.txt"
        target.write_text(typed + "\n", encoding="utf-8")
    else:
        return None
    try:
        load_prompts(target, field)
    except SpecError as exc:  # named relative to the run directory: the server's paths are not the visitor's
        raise gr.Error(str(exc).replace(f"{directory}/", "")) from None
    return target.name


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
