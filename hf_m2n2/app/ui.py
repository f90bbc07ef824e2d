"""The app's page (`build_demo`) and its Gradio callbacks: run, cancel, push, and the tab being closed."""

import argparse
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import yaml

from hf_m2n2.app.forms import (
    _HUB_ID,
    EVOLVE_ALGORITHMS,
    FIELD,
    HUB,
    LM_EVAL,
    SPECIALISTS,
    _evaluate,
    evolve_spec,
    method_help,
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
    progress_frame,
    score_table,
    zip_model,
)

log = logging.getLogger(__name__)

POLL_S = 0.5


# ---------------------------------------------------------------------- the app


@dataclass
class _Settings:
    specialists_dir: Path
    specialists_config: Any
    work_dir: Path
    allow_local_models: bool
    allow_remote_code: bool = False
    jobs: dict[str, Job] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    build_lock: threading.Lock = field(default_factory=threading.Lock)


def default_specialists_dir() -> Path:
    """Where the bundled specialists are built on first use: `$HF_M2N2_SPECIALISTS_DIR`, else the user cache."""
    env = os.environ.get("HF_M2N2_SPECIALISTS_DIR")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "hf_m2n2" / "specialists"


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
) -> gr.Blocks:
    """The Gradio app, with its queue set up (one run at a time).

    Args:
        specialists_dir: where the bundled tiny specialists are (built there on first use, cached).
        specialists_config: a `hf_m2n2.demo.specialists.SpecialistsConfig` (default: the demo's).
        work_dir: where runs are written (default: a folder under the system temp dir, which Gradio serves).
        allow_local_models: accept local directories as seeds (never on a public Space).
        allow_remote_code: offer the "trust the seeds' custom code" box; without it the box is hidden and a run
            asking for it is refused (the seeds' Python would run on this host: never on a public Space).
        prebuild_specialists: build the tiny specialists now, in the background (a Space's first visitor then
            does not wait for them).

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
    )
    on_space = _on_space()
    if prebuild_specialists:
        threading.Thread(target=_build_specialists, args=(settings,), name="specialists", daemon=True).start()

    with gr.Blocks(title="hf-m2n2: merge and evolve models", analytics_enabled=False) as demo:
        gr.Markdown(
            "# hf-m2n2: merge and evolve Hugging Face models\n"
            "Pick seeds, a static merge method (mergekit's) or an evolution (**M2N2** or a baseline) with a budget, "
            "and a fitness; the merged model comes with its lineage card. Same engine as the `hf-m2n2` CLI.",
            elem_id="title",
        )
        form: dict[str, Any] = {}  # field name -> its component, in the page's order

        def place(*names: str, **overrides: Any) -> None:
            for name in names:
                form[name] = FIELD[name].build(**overrides)

        with gr.Row():
            with gr.Column(scale=4):
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
                place("trust_remote_code", visible=allow_remote_code)  # an operator's choice, not a visitor's
                with gr.Row():
                    run_btn = gr.Button("Run", variant="primary", elem_id="run-btn")
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
        if list(form) != list(FIELD):
            raise AssertionError(
                f"the page places the fields {list(form)}, not those declared: {list(FIELD)}"
            )

        def on_method(name: str):
            evolve = name in EVOLVE_ALGORITHMS
            return method_help(name), gr.update(visible=evolve), gr.update(visible=not evolve)

        form["method"].change(
            on_method, form["method"], [info, evolve_box, static_box], api_visibility="private"
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
            run,
            inputs_kwargs=form,  # each field's value under its name (the /run endpoint's parameters)
            outputs=[status, plot, table, card, download, model_state],
            api_name="run",
            concurrency_limit=1,
            concurrency_id="run",
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
            cancel, None, status, api_name="cancel", cancels=[run_event], concurrency_limit=None, queue=False
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


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "default"


def _build_specialists(settings: _Settings) -> Any:
    from hf_m2n2.demo.specialists import build_specialists

    with settings.build_lock:
        return build_specialists(settings.specialists_dir, settings.specialists_config, log=log.info)


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
    for ref in [*refs, *([base] if base else [])]:
        if not settings.allow_local_models and (not _HUB_ID.match(ref) or Path(ref).exists()):
            raise gr.Error(f"{ref!r} is not a Hub model id (org/name or org/name@revision)")
    if len(refs) < 2 and values["method"] in EVOLVE_ALGORITHMS:
        raise gr.Error("give at least two seed models (one per line)")
    if not refs:
        raise gr.Error("give the seed models (one Hub id per line)")
    if len(set(refs)) != len(refs):
        raise gr.Error("a seed model is listed twice")
    return refs, base, None


def _outputs(
    status: str,
    plot: Any = None,
    table: Any = None,
    card: Any = None,
    download: Any = None,
    model: Any = None,
) -> tuple[Any, ...]:
    skip = gr.skip()
    return (
        status,
        skip if plot is None else plot,
        skip if table is None else table,
        skip if card is None else card,
        skip if download is None else download,
        skip if model is None else model,
    )


def _run(
    settings: _Settings, request: Any, progress: Any, values: dict[str, Any]
) -> Iterator[tuple[Any, ...]]:
    from hf_m2n2.errors import HfM2n2Error, first_line
    from hf_m2n2.hub_log import mask_secrets

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
    session = _session(request)
    previous = settings.jobs.pop(session, None)
    if previous is not None:  # one run directory per session: the last one goes (once its job has stopped)
        previous.stop.set()
        threading.Thread(target=_remove_when_done, args=(previous,), daemon=True).start()
    yield _outputs(
        "Preparing the seeds ...",
        plot=progress_frame(Path("/nonexistent")),
        table=score_table({}, ""),
        card="",
    )
    directory = settings.work_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    directory.mkdir(parents=True)
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
            evaluate,
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
    settings.jobs[session] = job
    job.start(target, settings.lock)
    started = time.perf_counter()
    shown, last_yield = (-1, ""), 0.0
    try:
        while not job.done.wait(POLL_S):
            now = time.perf_counter()
            done = passes_done(directory / "run") if job.kind == "evolve" else 0
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
            if (done, desc) != shown or now - last_yield >= 2:  # new data, or the elapsed time every 2 s
                plot = (
                    progress_frame(directory / "run")
                    if job.kind == "evolve" and (done, desc) != shown
                    else None
                )
                shown, last_yield = (done, desc), now
                yield _outputs(f"**Running** ({now - started:.0f} s): {desc}", plot=plot)
    finally:
        if not job.done.is_set():  # the event was cancelled or the client left: stop the worker too
            job.stop.set()
    elapsed = time.perf_counter() - started
    if isinstance(job.error, Cancelled):
        done = passes_done(directory / "run") if job.kind == "evolve" else 0
        what = f" after {done} of {job.budget} forward passes" if job.kind == "evolve" else ""
        yield _outputs(
            f"**Cancelled**{what} ({elapsed:.0f} s).",
            plot=progress_frame(directory / "run") if job.kind == "evolve" else None,
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
        plot=progress_frame(directory / "run") if job.kind == "evolve" else None,
        table=table,
        card=card_preview(job.out_dir),
        download=str(archive),
        model=str(job.out_dir),
    )


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
        "--allow-local-models", action="store_true", help="accept local directories as seeds (not on a Space)"
    )
    parser.add_argument(
        "--allow-remote-code",
        action="store_true",
        help="offer the box that lets the seeds' custom Python code run on this host (not on a public Space)",
    )
    parser.add_argument(
        "--prebuild", action="store_true", help="build the tiny specialists at start-up, in the background"
    )
    args = parser.parse_args(argv)
    demo = build_demo(
        specialists_dir=args.specialists_dir,
        work_dir=args.work_dir,
        allow_local_models=args.allow_local_models,
        allow_remote_code=args.allow_remote_code,
        prebuild_specialists=args.prebuild,
    )
    allowed = [args.work_dir] if args.work_dir else None
    demo.launch(server_name=args.host, server_port=args.port, allowed_paths=allowed)
    return 0
