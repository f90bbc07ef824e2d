"""The app's page (`build_demo`) and its Gradio callbacks: run (language models, text-to-image), cancel, push,
and the browser tab being closed."""

import argparse
import inspect
import ipaddress
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gradio as gr
import yaml

from hf_m2n2.app.forms import (
    _HUB_ID,
    EVOLVE_ALGORITHMS,
    FIELD,
    HUB,
    LM_EVAL,
    SPECIALISTS,
    T2I_BUNDLED,
    T2I_FIELD,
    T2I_HUB,
    WEBSHOP_PART,
    _evaluate,
    agent_fitness,
    clip_section,
    evolve_spec,
    method_help,
    optional_number,
    prompts_file,
    static_methods,
    static_spec,
)
from hf_m2n2.app.jobs import (
    Cancelled,
    Job,
    _evolve_job,
    _merge_job,
    _remove_when_done,
    card_preview,
    passes_done,
    preview_gallery,
    progress_frame,
    score_table,
    zip_model,
)

log = logging.getLogger(__name__)

POLL_S = 0.5
LLM_TAB, T2I_TAB = "llm", "t2i"
# what each run endpoint returns, in order (`_outputs`): /run (language models), /run_t2i (with the gallery)
LLM_OUTPUTS = ("status", "plot", "table", "card", "download", "model")
T2I_OUTPUTS = ("status", "plot", "gallery", "table", "card", "download", "model")


# ---------------------------------------------------------------------- the app


@dataclass
class _Settings:
    specialists_dir: Path
    specialists_config: Any
    work_dir: Path
    allow_local_models: bool
    allow_remote_code: bool = False
    t2i_dir: Path = field(default_factory=lambda: default_t2i_dir())
    jobs: dict[str, Job] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    build_lock: threading.Lock = field(default_factory=threading.Lock)


def default_specialists_dir() -> Path:
    """Where the bundled specialists are built on first use: `$HF_M2N2_SPECIALISTS_DIR`, else the user cache."""
    return _build_dir("HF_M2N2_SPECIALISTS_DIR", "specialists")


def default_t2i_dir() -> Path:
    """Where the bundled text-to-image world is built on first use: `$HF_M2N2_T2I_DIR`, else the user cache."""
    return _build_dir("HF_M2N2_T2I_DIR", "t2i")


def _build_dir(variable: str, name: str) -> Path:
    env = os.environ.get(variable)
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "hf_m2n2" / name


def _on_space() -> bool:
    return bool(os.environ.get("SPACE_ID")) and bool(os.environ.get("OAUTH_CLIENT_ID"))


def build_demo(
    *,
    specialists_dir: str | os.PathLike[str] | None = None,
    specialists_config: Any = None,
    work_dir: str | os.PathLike[str] | None = None,
    allow_local_models: bool = False,
    allow_remote_code: bool = False,
    prebuild_specialists: bool = False,
    t2i_dir: str | os.PathLike[str] | None = None,
) -> gr.Blocks:
    """The Gradio app, with its queue set up (one run at a time).

    Two tabs: language models (static merges and evolutions, lm-eval fitness) and text-to-image pipelines
    (evolutions with a CLIP fitness, and a gallery of the best candidate's images that follows the run). The page
    opens on the second with `?mode=t2i` in its address.

    Args:
        specialists_dir: where the bundled tiny specialists are (built there on first use, cached).
        specialists_config: a `hf_m2n2.demo.specialists.SpecialistsConfig` (default: the demo's).
        work_dir: where runs are written (default: a folder under the system temp dir, which Gradio serves).
        allow_local_models: accept local directories as seeds and judges, and WebShop servers on this host or a
            private network (never on a public Space).
        allow_remote_code: offer the "trust the seeds' custom code" box; without it the box is hidden and a run
            asking for it is refused (the seeds' Python would run on this host: never on a public Space).
        prebuild_specialists: build the tiny specialists and the bundled text-to-image world now, in the
            background (a Space's first visitor then does not wait for them).
        t2i_dir: where the bundled text-to-image world is (built there on first use, cached;
            `hf_m2n2.app.bundled.bundled_t2i`).

    Returns:
        The Blocks app; `demo.launch()` serves it.
    """
    work = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / "hf_m2n2_app"
    work.mkdir(parents=True, exist_ok=True)
    settings = _Settings(
        Path(specialists_dir) if specialists_dir else default_specialists_dir(),
        specialists_config,
        work,
        allow_local_models,
        allow_remote_code,
        Path(t2i_dir) if t2i_dir else default_t2i_dir(),
    )
    on_space = _on_space()
    if prebuild_specialists:
        for build in (_build_specialists, _build_t2i):
            threading.Thread(target=build, args=(settings,), name=build.__name__, daemon=True).start()

    with gr.Blocks(title="hf-m2n2: merge and evolve models", analytics_enabled=False) as demo:
        gr.Markdown(
            "# hf-m2n2: merge and evolve Hugging Face models\n"
            "Pick seeds, a static merge method (mergekit's) or an evolution (**M2N2** or a baseline) with a budget, "
            "and a fitness; the merged model comes with its lineage card. Language models are scored with lm-eval, "
            "text-to-image pipelines with a CLIP judge. Same engine as the `hf-m2n2` CLI.",
            elem_id="title",
        )
        form: dict[str, Any] = {}  # field name -> its component, in the page's order
        t2i_form: dict[str, Any] = {}

        def place(*names: str, **overrides: Any) -> None:
            for name in names:
                form[name] = FIELD[name].build(**overrides)

        def place_t2i(*names: str) -> None:
            for name in names:
                t2i_form[name] = T2I_FIELD[name].build(elem_id=f"t2i-{name.replace('_', '-')}")

        with gr.Row():
            with gr.Column(scale=4):
                with gr.Tabs(selected=LLM_TAB, elem_id="mode") as tabs:
                    with gr.Tab("Language models", id=LLM_TAB, elem_id="mode-llm") as llm_tab:
                        place("source", "hub_ids", "base_id", "method")
                        info = gr.Markdown(method_help(FIELD["method"].default), elem_id="method-help")
                        with gr.Group(visible=True) as evolve_box:
                            place("budget")
                            with gr.Row():
                                place("seed", "archive")
                        with gr.Group(visible=False) as static_box:
                            place("weights", "density", "t", "extra", "score_static")
                        place("fitness")
                        with gr.Group(visible=False) as lm_eval_box:
                            place("tasks", "test_tasks")
                            with gr.Row():
                                place("metric", "limit")
                            with gr.Row():
                                place("split", "test_split")
                        # an operator's choice, not a visitor's
                        place("trust_remote_code", visible=allow_remote_code)
                        with gr.Accordion(
                            "Agent fitness (WebShop)", open=False, elem_id="agent-box"
                        ) as agent_box:
                            place("webshop_server", "webshop_sessions", "webshop_test_sessions")
                            with gr.Row():
                                place("webshop_max_rounds", "webshop_max_new_tokens")
                        run_btn = gr.Button("Run", variant="primary", elem_id="run-btn")
                    with gr.Tab("Text-to-image", id=T2I_TAB, elem_id="mode-t2i") as t2i_tab:
                        place_t2i("source", "pipelines", "judge")
                        place_t2i("prompts", "prompts_file", "test_prompts", "test_prompts_file")
                        with gr.Row():
                            place_t2i("images_per_prompt", "steps")
                        with gr.Row():
                            place_t2i("guidance", "size")
                        place_t2i("algorithm")
                        t2i_info = gr.Markdown(
                            method_help(T2I_FIELD["algorithm"].default), elem_id="t2i-method-help"
                        )
                        place_t2i("budget")
                        with gr.Row():
                            place_t2i("seed", "archive")
                        t2i_run_btn = gr.Button("Run", variant="primary", elem_id="t2i-run-btn")
                cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn")
            with gr.Column(scale=5):
                status = gr.Markdown("Ready.", elem_id="status")
                plot = gr.LinePlot(
                    x="passes",
                    y="score",
                    color="series",
                    y_lim=[0, 1],
                    title="Fitness",
                    x_title="forward passes",
                    y_title="score",
                    label="Fitness",
                    elem_id="fitness-plot",
                )
                gallery = gr.Gallery(
                    label="Best candidate so far: its images, drawn while it was scored",
                    columns=4,
                    object_fit="contain",
                    format="png",
                    interactive=False,
                    visible=False,
                    elem_id="best-gallery",
                )
                table = gr.Dataframe(
                    score_table({}, ""), label="Seeds vs merged", interactive=False, elem_id="score-table"
                )
                download = gr.File(label="Merged model (zip)", interactive=False, elem_id="download")
                with gr.Accordion("Push to the Hub", open=False, elem_id="push-box"):
                    if on_space:
                        gr.LoginButton(elem_id="login")
                    repo_id = gr.Textbox(label="Repository (your-name/model-name)", elem_id="repo-id")
                    token = gr.Textbox(
                        label="Hugging Face token (write)" + (", unless signed in" if on_space else ""),
                        type="password",
                        elem_id="hf-token",
                    )
                    private = gr.Checkbox(True, label="Private repository", elem_id="private")
                    push_btn = gr.Button("Push", elem_id="push-btn")
                    push_status = gr.Markdown(elem_id="push-status")
        with gr.Accordion("Model card", open=True):
            card = gr.Markdown(elem_id="card-preview")
        model_state = gr.State(None)
        for placed, declared in ((form, FIELD), (t2i_form, T2I_FIELD)):
            if list(placed) != list(declared):
                raise AssertionError(
                    f"the page places the fields {list(placed)}, not those declared: {list(declared)}"
                )

        def on_method(name: str):
            evolve = name in EVOLVE_ALGORITHMS
            shown = gr.update(visible=evolve)
            return method_help(name), shown, gr.update(visible=not evolve), shown

        form["method"].change(
            on_method, form["method"], [info, evolve_box, static_box, agent_box], api_visibility="private"
        )
        form["source"].change(
            lambda s: (gr.update(visible=s == HUB), gr.update(visible=s == HUB)),
            form["source"],
            [form["hub_ids"], form["base_id"]],
            api_visibility="private",
        )
        form["fitness"].change(
            lambda f: gr.update(visible=f == LM_EVAL), form["fitness"], lm_eval_box, api_visibility="private"
        )
        t2i_form["source"].change(
            lambda s: gr.update(visible=s == T2I_HUB),
            t2i_form["source"],
            t2i_form["pipelines"],
            api_visibility="private",
        )
        t2i_form["algorithm"].change(method_help, t2i_form["algorithm"], t2i_info, api_visibility="private")

        def show_mode(mode: str) -> tuple[Any, Any]:
            """The gallery shows in the text-to-image mode only; its CLIP scores (0-100) get a free y axis."""
            t2i = mode == T2I_TAB
            return gr.Gallery(visible=t2i), gr.LinePlot(y_lim=None if t2i else [0, 1])

        llm_tab.select(lambda: show_mode(LLM_TAB), None, [gallery, plot], api_visibility="private")
        t2i_tab.select(lambda: show_mode(T2I_TAB), None, [gallery, plot], api_visibility="private")

        def open_mode(request: gr.Request):
            """`?mode=t2i` opens the page on the text-to-image tab."""
            if (request.query_params.get("mode") or "") != T2I_TAB:
                return gr.skip(), gr.skip(), gr.skip()
            return (gr.Tabs(selected=T2I_TAB), *show_mode(T2I_TAB))

        demo.load(open_mode, None, [tabs, gallery, plot], api_visibility="private")

        def run(
            request: gr.Request,
            progress=gr.Progress(),  # noqa: B008  (Gradio's way of asking for a progress tracker)
            **values: Any,
        ) -> Iterator[tuple[Any, ...]]:
            try:
                yield from _run(settings, request, progress, values)
            except gr.Error as exc:  # shown as a toast; the status line says it too
                yield _outputs(f"**Error**: {exc.message}")
                raise

        run_event = run_btn.click(
            _declaring(run, FIELD),
            inputs_kwargs=form,  # each field's value under its name (the /run endpoint's parameters)
            outputs=[status, plot, table, card, download, model_state],
            api_name="run",
            concurrency_limit=1,
            concurrency_id="run",
            # the status line says the stage and the passes done: no overlay hides the plot (and the gallery)
            # while they follow the run
            show_progress="hidden",
        )

        def run_t2i(
            request: gr.Request,
            progress=gr.Progress(),  # noqa: B008
            **values: Any,
        ) -> Iterator[tuple[Any, ...]]:
            try:
                yield from _run_t2i(settings, request, progress, values)
            except gr.Error as exc:
                yield _outputs(f"**Error**: {exc.message}", T2I_OUTPUTS)
                raise

        t2i_event = t2i_run_btn.click(
            _declaring(run_t2i, T2I_FIELD),
            inputs_kwargs=t2i_form,  # the /run_t2i endpoint's parameters
            outputs=[status, plot, gallery, table, card, download, model_state],
            api_name="run_t2i",
            concurrency_limit=1,
            concurrency_id="run",
            show_progress="hidden",
        )

        def cancel(request: gr.Request) -> str:
            job = settings.jobs.get(_session(request))
            if job is None or job.done.is_set():
                return "Nothing to cancel."
            job.stop.set()
            if job.kind == "evolve":
                done = passes_done(job.directory / "run")
                return (
                    f"**Cancelled** after {done} of {job.budget} forward passes: the evolution stops after its "
                    "current step (checkpointed)."
                )
            return "**Cancelled**: the merge stops before scoring."

        cancel_btn.click(
            cancel,
            None,
            status,
            api_name="cancel",
            cancels=[run_event, t2i_event],
            concurrency_limit=None,
            queue=False,
        )

        def push(
            model_dir: str | None,
            repo_id: str,
            token: str,
            private: bool,
            oauth_token: gr.OAuthToken | None,
            profile: gr.OAuthProfile | None,
        ) -> str:
            return _push(model_dir, repo_id, token, private, oauth_token, profile)

        push_btn.click(
            push,
            [model_state, repo_id, token, private],
            push_status,
            api_name="push",
            concurrency_limit=2,
            concurrency_id="push",
        )

        def forget(request: gr.Request) -> None:
            """The visitor closed the tab: stop their run and delete its directory."""
            job = settings.jobs.pop(_session(request), None)
            if job is not None:
                job.stop.set()
                threading.Thread(target=_remove_when_done, args=(job,), daemon=True).start()

        demo.unload(forget)
    demo.queue(default_concurrency_limit=1)
    return demo


def _declaring(fn: Any, fields: dict[str, Any]) -> Any:
    """`fn` (which takes the form's values as `**values`), its signature naming each field as a keyword with the
    field's default: Gradio's API then makes every field optional, those whose default is None (a file) too."""
    signature = inspect.signature(fn)
    kept = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    named = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default) for f in fields.values()
    ]
    fn.__signature__ = signature.replace(parameters=[*kept, *named])
    return fn


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def _build_specialists(settings: _Settings) -> Any:
    from hf_m2n2.demo.specialists import build_specialists

    with settings.build_lock:
        return build_specialists(settings.specialists_dir, settings.specialists_config, log=log.info)


def _build_t2i(settings: _Settings) -> Any:
    from hf_m2n2.app.bundled import bundled_t2i

    with settings.build_lock:
        return bundled_t2i(settings.t2i_dir)


def _check_refs(settings: _Settings, refs: Sequence[str]) -> None:
    """Refuse what is not a Hub model id (a local path reads this host's files), unless the operator allows
    local models."""
    for ref in refs:
        if not settings.allow_local_models and (not _HUB_ID.match(ref) or Path(ref).exists()):
            raise gr.Error(f"{ref!r} is not a Hub model id (org/name or org/name@revision)")


def _check_server(settings: _Settings, url: str) -> None:
    """Refuse a WebShop server on this host or a private network (the server would send requests to its own
    neighbours for a visitor), unless the operator allows local models. A name is checked by what it resolves to
    now; one that does not resolve is left to the evaluator ("does not answer")."""
    if settings.allow_local_models:
        return
    host = urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return
    if any(not ipaddress.ip_address(a.split("%")[0]).is_global for a in addresses):
        raise gr.Error(
            f"{WEBSHOP_PART}.server: {host} is this host or a private network; this server reaches only public "
            "addresses (its operator allows local ones with --allow-local-models)"
        )


def _seeds(
    settings: _Settings, values: dict[str, Any], progress: Any, directory: Path
) -> tuple[list[str], str | None, Any]:
    """The seed references, the base model, and the specialists build (None for Hub seeds).

    The specialists are linked into the run's `directory` and named relative to it (`add`, `rev`, `base`,
    `tasks`): specs, cards and recipes then carry these names, not the server's paths."""
    if values["source"] == SPECIALISTS:
        progress(None, desc="building the tiny specialists (first use only, about a minute)")
        built = _build_specialists(settings)
        for name, path in [*built.models.items(), ("base", built.base), ("tasks", built.tasks_dir)]:
            (directory / name).symlink_to(path, target_is_directory=True)
        return list(built.models), "base", built
    refs = [line.strip() for line in (values["hub_ids"] or "").splitlines() if line.strip()]
    base = (values["base_id"] or "").strip() or None
    _check_refs(settings, [*refs, *([base] if base else [])])
    if len(refs) < 2 and values["method"] in EVOLVE_ALGORITHMS:
        raise gr.Error("give at least two seed models (one per line)")
    if not refs:
        raise gr.Error("give the seed models (one Hub id per line)")
    if len(set(refs)) != len(refs):
        raise gr.Error("a seed model is listed twice")
    return refs, base, None


def _t2i_spec(settings: _Settings, values: dict[str, Any], progress: Any, directory: Path) -> dict[str, Any]:
    """The evolve spec of the text-to-image form, its files in the run's `directory`.

    What the visitor leaves to the bundled world (seeds, judge, prompts) is linked into `directory` and named
    relative to it (`en`, `ja`, `judge`, `prompts.jsonl`, `test_prompts.jsonl`), as the specialists are; typed or
    uploaded prompts are written there (`prompts.txt`, `prompts.jsonl`, ...)."""
    world: Any = None

    def bundled() -> Any:
        nonlocal world
        if world is None:
            progress(None, desc="building the bundled text-to-image world (first use only)")
            world = _build_t2i(settings)
        return world

    def link(name: str, path: Path) -> str:
        (directory / name).symlink_to(path, target_is_directory=path.is_dir())
        return name

    algorithm = values["algorithm"]
    if algorithm not in EVOLVE_ALGORITHMS:
        raise gr.Error(f"algorithm: unknown {algorithm!r} (choose one of {', '.join(EVOLVE_ALGORITHMS)})")
    prompts = prompts_file(values["prompts"], values["prompts_file"], directory, "prompts")
    test_prompts = prompts_file(
        values["test_prompts"], values["test_prompts_file"], directory, "test_prompts"
    )
    if values["source"] == T2I_BUNDLED:
        refs = [link(name, path) for name, path in bundled().seeds.items()]
    else:
        refs = [line.strip() for line in (values["pipelines"] or "").splitlines() if line.strip()]
        _check_refs(settings, refs)
        if len(refs) < 2:
            raise gr.Error("give at least two text-to-image pipelines (one per line)")
        if len(set(refs)) != len(refs):
            raise gr.Error("a pipeline is listed twice")
    judge = (values["judge"] or "").strip()
    if judge:
        _check_refs(settings, [judge])
    else:
        judge = link("judge", bundled().judge)
    if prompts is None:
        prompts = link("prompts.jsonl", bundled().prompts)
        if test_prompts is None:
            test_prompts = link("test_prompts.jsonl", bundled().test_prompts)
    evaluate = clip_section(
        judge,
        prompts,
        test_prompts=test_prompts,
        images_per_prompt=values["images_per_prompt"],
        num_inference_steps=values["steps"],
        guidance_scale=optional_number(values["guidance"], "evaluate.guidance_scale"),
        size=optional_number(values["size"], "evaluate.height"),
    )
    return evolve_spec(
        algorithm,
        refs,
        evaluate,
        budget=int(values["budget"]),
        seed=int(values["seed"] or 0),
        archive_size=max(2, int(values["archive"] or 20)),
        block_size=1024 if values["source"] == T2I_BUNDLED else 65536,
    )


def _outputs(status: str, names: Sequence[str] = LLM_OUTPUTS, **values: Any) -> tuple[Any, ...]:
    """One update of a run endpoint's outputs (`names`, in order): the status line, and what `values` gives (the
    other outputs are left as they are)."""
    unknown = set(values) - set(names)
    if unknown:
        raise ValueError(f"not outputs of this endpoint: {sorted(unknown)}")
    given = {"status": status, **{k: v for k, v in values.items() if v is not None}}
    return tuple(given.get(name, gr.skip()) for name in names)


def _new_run(settings: _Settings, request: Any) -> str:
    """The visitor's session; their previous run (one run directory per session) stops and goes."""
    session = _session(request)
    previous = settings.jobs.pop(session, None)
    if previous is not None:
        previous.stop.set()
        threading.Thread(target=_remove_when_done, args=(previous,), daemon=True).start()
    return session


def _run_directory(settings: _Settings) -> Path:
    directory = settings.work_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    directory.mkdir(parents=True)
    return directory


def _run(
    settings: _Settings, request: Any, progress: Any, values: dict[str, Any]
) -> Iterator[tuple[Any, ...]]:
    method = values["method"]
    evolve = method in EVOLVE_ALGORITHMS
    if not evolve and method not in static_methods():
        raise gr.Error(f"unknown method {method!r}")
    trust = bool(values.get("trust_remote_code"))
    if (
        trust and not settings.allow_remote_code
    ):  # checked here too: a crafted /run call can set the hidden box
        raise gr.Error(
            "trust_remote_code: this server does not run the seeds' custom code "
            "(its operator did not start it with --allow-remote-code)"
        )
    agent = agent_fitness(values) if evolve else None  # static merges are scored with lm-eval only
    if agent is not None:
        _check_server(settings, agent["server"])
    session = _new_run(settings, request)
    yield _outputs(
        "Preparing the seeds ...",
        plot=progress_frame(Path("/nonexistent")),
        table=score_table({}, ""),
        card="",
    )
    directory = _run_directory(settings)
    try:
        refs, base, built = _seeds(settings, values, progress, directory)
        evaluate = _evaluate(values, built) if (evolve or values["score_static"]) else None
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    spec_path = directory / "spec.yaml"
    if evolve:
        budget = int(values["budget"])
        spec = evolve_spec(
            method,
            refs,
            evaluate if agent is None else [evaluate, agent],
            budget=budget,
            seed=int(values["seed"] or 0),
            archive_size=max(2, int(values["archive"] or 20)),
            block_size=1024 if built is not None else 65536,
            trust_remote_code=trust,
        )
        job = Job("evolve", directory, directory / "run" / "model", budget=budget)
        target = _evolve_job(spec_path)
        merged_name = spec["name"]
    else:
        # the specialists' base is the base of task-vector methods; slerp goes add -> rev
        if built is not None:
            uses_base = static_methods()[method].uses_base
            base = base if uses_base == "required" and method != "slerp" else None
        spec = static_spec(
            method,
            refs,
            base,
            weights=values["weights"],
            density=values["density"],
            t=values["t"],
            extra=values["extra"],
        )
        merged_name = f"{method}-merge"
        job = Job("merge", directory, directory / merged_name)
        target = _merge_job(spec_path, merged_name, refs, evaluate, trust_remote_code=trust)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    yield from _follow(settings, session, job, target, merged_name, progress, LLM_OUTPUTS)


def _run_t2i(
    settings: _Settings, request: Any, progress: Any, values: dict[str, Any]
) -> Iterator[tuple[Any, ...]]:
    session = _new_run(settings, request)
    yield _outputs(
        "Preparing the seeds ...",
        T2I_OUTPUTS,
        plot=progress_frame(Path("/nonexistent")),
        gallery=[],
        table=score_table({}, ""),
        card="",
    )
    directory = _run_directory(settings)
    try:
        spec = _t2i_spec(settings, values, progress, directory)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    spec_path = directory / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    job = Job("evolve", directory, directory / "run" / "model", budget=int(spec["evolve"]["budget"]))
    yield from _follow(settings, session, job, _evolve_job(spec_path), spec["name"], progress, T2I_OUTPUTS)


def _follow(
    settings: _Settings,
    session: str,
    job: Job,
    target: Any,
    merged_name: str,
    progress: Any,
    names: Sequence[str],
) -> Iterator[tuple[Any, ...]]:
    """Start the job and follow its run directory: progress, fitness plot and (when the endpoint has one) the
    gallery of the best candidate so far; then its outcome (score table, card, zip)."""
    from hf_m2n2.errors import HfM2n2Error, first_line
    from hf_m2n2.hub_log import mask_secrets

    directory, run_dir = job.directory, job.directory / "run"
    gallery = "gallery" in names
    settings.jobs[session] = job
    job.start(target, settings.lock)
    started = time.perf_counter()
    shown, last_yield = (-1, ""), 0.0
    best: tuple[int | None, float | None] = (None, None)  # the candidate the gallery shows, and its score
    try:
        while not job.done.wait(POLL_S):
            now = time.perf_counter()
            done = passes_done(run_dir) if job.kind == "evolve" else 0
            if job.kind == "merge" or job.stage != "evolving":
                desc = job.stage
                progress(None, desc=desc)
            elif done == 0:
                desc = "starting: opening the seeds, Gram sums, first candidate"
                progress(None, desc=desc)
            elif done >= job.budget:
                desc = "held-out report and export"
                progress(None, desc=desc)
            else:
                desc = f"evolving: {done}/{job.budget} forward passes"
                progress((done, job.budget), desc=desc, unit="passes")
            images = None
            if gallery:
                candidate, score, items = preview_gallery(run_dir, known=best[0])
                if candidate is not None and items is not None:  # a new best candidate
                    best, images = (candidate, score), items
            if (done, desc) != shown or images is not None or now - last_yield >= 2:
                # new data, or the elapsed time every 2 s
                plot = progress_frame(run_dir) if job.kind == "evolve" and (done, desc) != shown else None
                shown, last_yield = (done, desc), now
                yield _outputs(
                    f"**Running** ({now - started:.0f} s): {desc}{_best_note(best)}",
                    names,
                    plot=plot,
                    **({"gallery": images} if gallery else {}),
                )
    finally:
        if not job.done.is_set():  # the event was cancelled or the client left: stop the worker too
            job.stop.set()
    elapsed = time.perf_counter() - started
    final_gallery = {"gallery": preview_gallery(run_dir)[2]} if gallery else {}
    if isinstance(job.error, Cancelled):
        done = passes_done(run_dir) if job.kind == "evolve" else 0
        what = f" after {done} of {job.budget} forward passes" if job.kind == "evolve" else ""
        yield _outputs(
            f"**Cancelled**{what} ({elapsed:.0f} s).",
            names,
            plot=progress_frame(run_dir) if job.kind == "evolve" else None,
            **final_gallery,
        )
        return
    if isinstance(job.error, HfM2n2Error):
        raise gr.Error(mask_secrets(first_line(job.error)))
    if job.error is not None:
        log.error("run failed", exc_info=job.error)
        raise gr.Error(mask_secrets(f"{type(job.error).__name__}: {first_line(job.error)}"))
    progress(None, desc="packing the model")
    archive = zip_model(job.out_dir, directory / merged_name)
    table = score_table(job.report or {}, merged_name, job.roles)
    summary = f"**Done** in {elapsed:.0f} s: `{merged_name}`"
    if job.report and merged_name in job.report:
        rows = {name: sum(s.values()) / len(s) for name, s in job.report.items() if s}
        seeds = [v for name, v in rows.items() if name != merged_name and name not in job.roles]
        if seeds:
            summary += f", mean {rows[merged_name]:.3f} vs best seed {max(seeds):.3f}"
    yield _outputs(
        summary + ".",
        names,
        plot=progress_frame(run_dir) if job.kind == "evolve" else None,
        table=table,
        card=card_preview(job.out_dir),
        download=str(archive),
        model=str(job.out_dir),
        **final_gallery,
    )


def _best_note(best: tuple[int | None, float | None]) -> str:
    candidate, score = best
    return "" if candidate is None else f"; best so far: candidate {candidate} (mean score {score:.3f})"


def _push(
    model_dir: str | None,
    repo_id: str,
    token_text: str,
    private: bool,
    oauth_token: Any,
    profile: Any,
) -> str:
    """Push the last merged model; the token (typed or OAuth) appears in no output, log or file."""
    from hf_m2n2.errors import HfM2n2Error, first_line
    from hf_m2n2.hub_log import mask_secrets

    secret = (token_text or "").strip() or (oauth_token.token if oauth_token is not None else None)
    if not model_dir or not Path(model_dir).is_dir():
        raise gr.Error("run a merge first")
    repo_id = (repo_id or "").strip()
    if repo_id and "/" not in repo_id and profile is not None:
        repo_id = f"{profile.username}/{repo_id}"
    if not re.match(r"^([\w.-]+/)?[\w.-]+$", repo_id):  # a bare name goes to the token owner's namespace
        raise gr.Error("repository: expected your-name/model-name")
    if not secret:  # never fall back to the server's own HF_TOKEN: visitors push to their namespace only
        raise gr.Error("sign in with Hugging Face or paste a write token")
    try:
        from hf_m2n2.push import push_folder

        result = push_folder(model_dir, repo_id, token=secret, private=bool(private))
    except HfM2n2Error as exc:
        raise gr.Error(mask_secrets(str(exc), secret)) from None
    except Exception as exc:  # network or Hub errors: one line, the token masked
        raise gr.Error(mask_secrets(f"{type(exc).__name__}: {first_line(exc)}", secret)) from None
    commit = f"[{result.commit_oid[:8]}]({result.commit_url})"
    return f"Pushed to [{result.repo_url}]({result.repo_url}) (commit {commit})."


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hf_m2n2.app`: serve the app."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_m2n2.app", description="Serve the hf-m2n2 Gradio app."
    )
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--specialists-dir", help="where the bundled tiny specialists are built (cached)")
    parser.add_argument("--work-dir", help="where runs are written (default: under the system temp dir)")
    parser.add_argument(
        "--allow-local-models",
        action="store_true",
        help="accept local directories as seeds and WebShop servers on this host or a private network (not on a Space)",
    )
    parser.add_argument(
        "--allow-remote-code",
        action="store_true",
        help="offer the box that lets the seeds' custom Python code run on this host (not on a public Space)",
    )
    parser.add_argument(
        "--t2i-dir", help="where the bundled text-to-image world (seeds, judge, prompts) is built (cached)"
    )
    parser.add_argument(
        "--prebuild",
        action="store_true",
        help="build the tiny specialists and the text-to-image world at start-up, in the background",
    )
    args = parser.parse_args(argv)
    demo = build_demo(
        specialists_dir=args.specialists_dir,
        work_dir=args.work_dir,
        allow_local_models=args.allow_local_models,
        allow_remote_code=args.allow_remote_code,
        prebuild_specialists=args.prebuild,
        t2i_dir=args.t2i_dir,
    )
    allowed = [args.work_dir] if args.work_dir else None
    demo.launch(server_name=args.host, server_port=args.port, allowed_paths=allowed)
    return 0
