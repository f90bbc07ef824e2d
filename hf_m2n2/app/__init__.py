"""The Gradio app (the Hugging Face Space): merge or evolve models from a browser, with the same API as the CLI.

Two modes (tabs): language models (static merges or evolutions scored with lm-eval) and text-to-image pipelines
(evolutions scored per prompt by a CLIP judge: the `/run_t2i` endpoint, `?mode=t2i` in the page's address). In the
second, a gallery shows the images of the best candidate so far while the run goes: the CLIP evaluator keeps them in
the run directory (`preview/`, from the images it drew to score the candidate) and the page polls them as it polls
the progress.

An evolution of language models may add an agent fitness (the "Agent fitness (WebShop)" accordion): the visitor's
WebShop env server and sessions, the spec's `evaluate:` then a list (the lm-eval section and a `kind: webshop` part),
the score table one column per figure (`webshop`, `webshop_success` beside the tasks).

Every run writes a spec in the CLI's YAML schema and calls what `hf-m2n2` calls: `hf_m2n2.merge.run_merge` for a
static merge, `hf_m2n2.evolve.runs.start_runs` for an evolution (M2N2 or a baseline). The job runs in a worker
thread; the event handler polls the run directory (`history.jsonl`, `lineage.jsonl`) to move the progress bar and
redraw the fitness plot, and stops the job through `hf_m2n2.evolve.loop.stop_when` (the loop checkpoints and
stops after its current step). At the end it shows the seeds-vs-merged score table (`report.json` of the run; for
static merges the seeds and the merge are scored with the same lm-eval evaluator), the model card, a zip of the
model, and pushes it to the Hub with `hf_m2n2.push.push_folder` (OAuth on a Space, or a token field whose value is
never written to any output, log or file).

Gradio is imported here only: the rest of the package never imports `hf_m2n2.app`.

Modules:
    forms: the forms' choices and help, and the specs written from their values (`static_spec`, `evolve_spec`,
        `lm_eval_section`, `webshop_section` and `agent_fitness`, `clip_section`, `prompts_file`, `optional_number`).
    jobs: a run in a worker thread (`Job`), scoring (`score_models`), and the readers of a run directory
        (`progress_frame`, `passes_done`, `preview_gallery`, `score_table`, `card_preview`, `zip_model`). No Gradio.
    bundled: the bundled text-to-image world (`bundled_t2i`: seeds, judge, prompts). No Gradio.
    ui: the page (`build_demo`), its callbacks, and `main` (`python -m hf_m2n2.app`).

Example:
    >>> demo = build_demo()  # doctest: +SKIP
    >>> demo.launch(server_name="127.0.0.1")  # doctest: +SKIP

Command line: `python -m hf_m2n2.app [--host 127.0.0.1] [--port 7860] [--allow-local-models] [--allow-remote-code]
[--t2i-dir DIR]`.
"""

from hf_m2n2.app.bundled import BundledT2I, bundled_t2i
from hf_m2n2.app.forms import (
    DEMO_TASKS,
    EVOLVE_ALGORITHMS,
    EXTRA_PARAMS_HELP,
    HIDDEN_METHODS,
    HUB,
    LM_EVAL,
    SPECIALISTS,
    T2I_BUNDLED,
    T2I_FIELDS,
    T2I_HUB,
    agent_fitness,
    clip_section,
    evolve_spec,
    lm_eval_section,
    method_choices,
    method_help,
    optional_number,
    prompts_file,
    static_methods,
    static_spec,
    webshop_section,
)
from hf_m2n2.app.jobs import (
    PLOT_SERIES,
    Cancelled,
    Job,
    card_preview,
    passes_done,
    preview_gallery,
    progress_frame,
    score_models,
    score_table,
    zip_model,
)
from hf_m2n2.app.ui import POLL_S, build_demo, default_specialists_dir, default_t2i_dir, main

__all__ = [
    "DEMO_TASKS",
    "EVOLVE_ALGORITHMS",
    "EXTRA_PARAMS_HELP",
    "HIDDEN_METHODS",
    "HUB",
    "LM_EVAL",
    "PLOT_SERIES",
    "POLL_S",
    "SPECIALISTS",
    "T2I_BUNDLED",
    "T2I_FIELDS",
    "T2I_HUB",
    "BundledT2I",
    "Cancelled",
    "Job",
    "agent_fitness",
    "build_demo",
    "bundled_t2i",
    "card_preview",
    "clip_section",
    "default_specialists_dir",
    "default_t2i_dir",
    "evolve_spec",
    "lm_eval_section",
    "main",
    "method_choices",
    "method_help",
    "optional_number",
    "passes_done",
    "preview_gallery",
    "progress_frame",
    "prompts_file",
    "score_models",
    "score_table",
    "static_methods",
    "static_spec",
    "webshop_section",
    "zip_model",
]
