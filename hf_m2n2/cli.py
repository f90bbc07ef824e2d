"""The `hf-m2n2` command line. Heavy libraries are imported inside the commands so `--help` is instant."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence

EXIT_USER_ERROR = 2

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgb]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from `5000000`, `500M`, `5GB`, `5B` (mergekit's billions), `2GiB`."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 5GB, 500MB, 1000000)")
    number, unit, binary, _ = match.groups()
    if unit.lower() == "b" and not binary:
        unit = "g"  # mergekit's "5B" = 5 billion
    power = {"": 0, "k": 1, "m": 2, "g": 3}[unit.lower()]
    return int(float(number) * (1024 if binary else 1000) ** power)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    from hf_m2n2 import __version__

    parser = argparse.ArgumentParser(prog="hf-m2n2", description="Merge and evolve Hugging Face models.")
    parser.add_argument("--version", action="version", version=f"hf-m2n2 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="merge models from a mergekit-style YAML spec")
    merge.add_argument("config", help="merge spec (mergekit YAML)")
    merge.add_argument("out_dir", help="output directory (written atomically)")
    merge.add_argument(
        "--out-shard-size", type=parse_size, default="5GB", help="max bytes per shard (default 5GB)"
    )
    merge.add_argument(
        "--copy-tokenizer",
        dest="copy_tokenizer",
        nargs="?",
        const=True,
        default=True,
        type=_bool,
        help="copy the base model's tokenizer (default)",
    )
    merge.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false")
    merge.add_argument("--random-seed", type=int, default=0, help="seed of randomized methods (default 0)")
    merge.add_argument("--device", default="cpu", help="device for the tensor math (cpu, cuda, cuda:1, ...)")
    merge.add_argument("--allow-crimes", action="store_true", help="merge models of different architectures")
    merge.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf in seed tensors")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    merge.add_argument("--workers", type=int, default=2, help="tensors computed concurrently (default 2)")
    merge.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the seeds' custom code run (auto_map in config.json or tokenizer_config.json)",
    )
    _lenient_flag(merge)
    merge.add_argument(
        "--output-format",
        choices=("diffusers", "single_file"),
        default="diffusers",
        help="pipelines: a diffusers folder (default), or one .safetensors in the original (A1111/ComfyUI) layout",
    )
    merge.add_argument(
        "--lazy-unpickle", action="store_true", help=argparse.SUPPRESS
    )  # mergekit compatibility
    _push_flags(merge)
    _verbosity(merge)

    validate = sub.add_parser("validate", help="check a spec (and, unless --no-resolve, that its models fit)")
    validate.add_argument("config")
    validate.add_argument("--no-resolve", action="store_true", help="only check the YAML, do not open models")
    _lenient_flag(validate, "; merge specs only (ignored for an evolve spec)")
    validate.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the seeds' custom code run (auto_map in config.json or tokenizer_config.json)",
    )
    _verbosity(validate)

    evolve = sub.add_parser("evolve", help="evolve models with M2N2 (or a baseline) from an evolve spec")
    evolve.add_argument("config", nargs="?", help="evolve spec (YAML); omit with --resume")
    evolve.add_argument("--out", metavar="DIR", help="run directory (with --runs: a directory of run-<r>/)")
    evolve.add_argument("--resume", metavar="DIR", help="continue the interrupted run(s) in DIR")
    evolve.add_argument(
        "--runs",
        type=int,
        metavar="N",
        help="N independent runs with seeds seed, seed+1, ... (one after another); with --resume, raise to N",
    )
    evolve.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    evolve.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow seeds with custom code (spec: trust_remote_code)",
    )
    evolve.add_argument(
        "--executor",
        choices=("local", "ray"),
        help="where candidates are evaluated (spec: executor.kind); kept for --resume unless given again",
    )
    evolve.add_argument("--workers", type=int, metavar="N", help="Ray workers (spec: executor.workers)")
    evolve.add_argument(
        "--ray-address", metavar="ADDR", help="Ray cluster to join (spec: executor.address; default: local)"
    )
    _push_flags(evolve)
    _verbosity(evolve)

    push = sub.add_parser("push", help="upload a result directory to a Hub repo (created if needed)")
    push.add_argument("out_dir", help="a merge output or an evolve run's model/ directory")
    push.add_argument("repo_id", help="ORG/NAME")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", metavar="BRANCH", help="commit to this branch (created if missing)")
    push.add_argument("--commit-message", help="default: the method or algorithm and the seeds")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    _verbosity(push)

    card = sub.add_parser("card", help="regenerate OUT_DIR/README.md from its card.json (weights untouched)")
    card.add_argument("out_dir")
    card.add_argument("--template", help="a Jinja card template (default: the packaged one)")
    card.add_argument(
        "--eval-results",
        metavar="JSON",
        help="scores to publish: lm-eval's results.json or {task: {metric: v}}",
    )
    card.add_argument("--model-id", help="the repo id shown in the usage snippet")
    _verbosity(card)

    rebuild = sub.add_parser(
        "rebuild", help="rebuild an evolved model's weights bit for bit from its recipe.json (or route.json)"
    )
    rebuild.add_argument(
        "recipe", help="recipe.json (or a routed model's route.json), next to the exported model"
    )
    rebuild.add_argument("out_dir")
    rebuild.add_argument("--out-shard-size", type=parse_size, default="5GB")
    rebuild.add_argument("--overwrite", action="store_true")
    _verbosity(rebuild)

    export = sub.add_parser(
        "export", help="export the best model of a finished evolve run (weights, card, plot)"
    )
    export.add_argument("run_dir", help="a model evolution run directory")
    export.add_argument("out_dir")
    export.add_argument("--overwrite", action="store_true")
    export.add_argument(
        "--front",
        type=int,
        metavar="K",
        help="an nsga2 run: export member K of its Pareto front (as numbered in RUN_DIR/pareto.json) instead of "
        "the best mean; its held-out scores are measured for the card",
    )
    export.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the seeds' custom code (auto_map in config.json or tokenizer_config.json) run, for runs started "
        "with --trust-remote-code (a spec's trust_remote_code: true is honoured without it)",
    )
    _verbosity(export)

    plot = sub.add_parser("plot", help="plot test score vs forward passes (mean +- stderr over runs) as PNG")
    plot.add_argument(
        "dirs", nargs="+", metavar="DIR", help="run directories, one line each (runs of DIR/run-*)"
    )
    plot.add_argument("-o", "--out", default="evolution.png", help="PNG file (default evolution.png)")
    plot.add_argument(
        "--metric",
        choices=["test", "best_train", "mean_train"],
        default="test",
        help="history column to plot",
    )
    plot.add_argument("--labels", help="comma-separated line labels, one per DIR (default: the run names)")
    plot.add_argument("--title", help="figure title")
    _verbosity(plot)
    # an unknown flag is reported with its command's usage, not the top level's
    parser.set_defaults(command_parsers=sub.choices)
    return parser


def _lenient_flag(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument(
        "--lenient-parameters",
        action="store_true",
        help="warn about and ignore parameter names the merge method does not declare (mergekit's behaviour)"
        + note,
    )


def _push_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--push",
        metavar="REPO_ID",
        help="upload the result to this Hub repo when done (spec: output.push_to_hub)",
    )
    parser.add_argument(
        "--private", action="store_const", const=True, default=None, help="create the pushed repo private"
    )


def _verbosity(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="more logging")
    group.add_argument("-q", "--quiet", action="store_true", help="only errors")


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    from hf_m2n2.hub_log import install

    install(verbose=args.verbose)  # one copy of huggingface_hub's lines, the token masked, retries said once
    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # huggingface_hub's download bars


def _cmd_merge(args: argparse.Namespace) -> int:
    from hf_m2n2.merge import MergeOptions, run_merge

    options = MergeOptions(
        out_shard_size=args.out_shard_size,
        copy_tokenizer=args.copy_tokenizer,
        random_seed=args.random_seed,
        device=args.device,
        allow_crimes=args.allow_crimes,
        overwrite=args.overwrite,
        allow_nonfinite=args.allow_nonfinite,
        workers=args.workers,
        trust_remote_code=args.trust_remote_code,
        progress=not args.quiet,
        push_to_hub=args.push,
        private=args.private,
        lenient_parameters=args.lenient_parameters,
        output_format=args.output_format,
    )
    result = run_merge(args.config, args.out_dir, options)
    if not args.quiet:
        gb = result.total_bytes / 1e9
        print(
            f"merged {len(result.seeds)} models into {result.out_dir} ({result.tensors} tensors, {gb:.2f} GB)"
        )
    if result.push is not None:
        _print_push(result.push.repo_url, result.push.commit_url)
    return 0


def _print_push(repo_url: str, commit_url: str) -> None:
    print(f"pushed to {repo_url} (commit {commit_url})")


def _cmd_push(args: argparse.Namespace) -> int:
    from hf_m2n2.push import push_folder

    result = push_folder(
        args.out_dir,
        args.repo_id,
        private=args.private or None,
        revision=args.revision,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
    )
    _print_push(result.repo_url, result.commit_url)
    if result.pr_url:
        print(f"pull request: {result.pr_url}")
    return 0


def _cmd_card(args: argparse.Namespace) -> int:
    from hf_m2n2.card import regenerate_card

    path = regenerate_card(
        args.out_dir, template=args.template, eval_results=args.eval_results, model_id=args.model_id
    )
    if not args.quiet:
        print(f"wrote {path}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hf_m2n2.evaluate import check_offline
    from hf_m2n2.evolve.spec import EvolveSpec, load_any_spec
    from hf_m2n2.merge import validate

    spec, _ = load_any_spec(args.config)
    if isinstance(spec, EvolveSpec):
        # what evolve checks before its first candidate: seeds open and fit (unless --no-resolve), callables
        # import, lm-eval task, metric and filter names (from the task YAMLs alone: no dataset, no network)
        spec_dir = Path(args.config).resolve().parent
        if args.trust_remote_code:
            spec = spec.model_copy(update={"trust_remote_code": True})
        spec.kind.preflight(spec, spec_dir, resolve=not args.no_resolve)
        check_offline(spec.evaluate, spec_dir)
        if not args.quiet:
            print(
                f"{args.config}: valid {spec.evolve.algorithm} evolve spec ({spec.evolve.budget} forward passes)"
            )
        return 0
    spec = validate(
        args.config,
        resolve=not args.no_resolve,
        lenient_parameters=args.lenient_parameters,
        trust_remote_code=args.trust_remote_code,
    )
    if not args.quiet:
        print(f"{args.config}: valid {spec.merge_method} spec over {len(spec.referenced_models())} models")
    return 0


def _cmd_rebuild(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hf_m2n2.blend_ops import rebuild
    from hf_m2n2.route_recipe import ROUTE_RECIPE, rebuild_route

    if Path(args.recipe).name == ROUTE_RECIPE:  # a routed model's recipe (data-flow space)
        out = rebuild_route(Path(args.recipe), Path(args.out_dir), overwrite=args.overwrite)
    else:
        out = rebuild(args.recipe, args.out_dir, overwrite=args.overwrite, shard_size=args.out_shard_size)
    if not args.quiet:
        print(f"rebuilt {out} from {args.recipe}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from hf_m2n2.evolve.front_export import export_front
    from hf_m2n2.evolve.outcome import export_run

    if args.front is not None:
        out = export_front(
            args.run_dir,
            args.out_dir,
            args.front,
            overwrite=args.overwrite,
            trust_remote_code=args.trust_remote_code,
        )
        if not args.quiet:
            print(f"exported member {args.front} of the Pareto front of {args.run_dir} to {out}")
        return 0
    out = export_run(
        args.run_dir, args.out_dir, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code
    )
    if not args.quiet:
        print(f"exported the best model of {args.run_dir} to {out}")
    return 0


def _cmd_evolve(args: argparse.Namespace) -> int:
    from hf_m2n2.errors import HfM2n2Error, InfrastructureError
    from hf_m2n2.evolve.runs import resume_runs, start_runs
    from hf_m2n2.hub_log import mask_secrets

    if args.resume and (args.config or args.out or args.overwrite or args.push or args.private):
        raise HfM2n2Error(
            "--resume DIR takes no spec, --out, --overwrite or --push (the run directory has them)"
        )
    if not args.resume and not (args.config and args.out):
        raise HfM2n2Error("give a spec and --out DIR, or --resume DIR")

    def report(run_dir, summary) -> None:
        if not args.quiet:
            test = summary.get("test")
            test_text = "n/a" if test is None else f"{test:.4f}"
            print(
                f"{run_dir}: {summary['name']} seed {summary['seed']}: best train {summary['best_train']:.4f}, "
                f"test {test_text} after {summary['forward_passes']} passes ({summary['timing']['wall_time_s']:.1f} s)"
            )
        if "push" in summary:
            _print_push(summary["push"]["repo_url"], summary["push"]["commit_url"])

    out = args.resume or args.out
    executor = {
        key: value
        for key, value in (("kind", args.executor), ("workers", args.workers), ("address", args.ray_address))
        if value is not None
    }
    try:
        if args.resume:
            resume_runs(
                args.resume,
                runs=args.runs,
                progress=not args.quiet,
                on_done=report,
                trust_remote_code=args.trust_remote_code,
                executor=executor or None,
            )
        else:
            start_runs(
                args.config,
                args.out,
                runs=args.runs,
                overwrite=args.overwrite,
                progress=not args.quiet,
                on_done=report,
                push_to_hub=args.push,
                private=args.private,
                trust_remote_code=args.trust_remote_code,
                executor=executor or None,
            )
    except KeyboardInterrupt:
        print(f"interrupted; continue with: hf-m2n2 evolve --resume {out}", file=sys.stderr)
        return 130
    except InfrastructureError as exc:
        print(
            f"error: {mask_secrets(str(exc))}; checkpointed, continue with: hf-m2n2 evolve --resume {out}",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    except OSError as exc:
        from pathlib import Path

        error = _storage_error(exc, out)
        if error is None or not any(Path(out).glob("**/checkpoint.npz")):
            raise
        fix = "free space and continue" if " cannot write: " in str(error) else "fix the disk and continue"
        hint = f"the last checkpoint is intact; {fix} with: hf-m2n2 evolve --resume {out}"
        print(f"error: {error}; {hint}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from hf_m2n2.plots import plot_runs

    labels = args.labels.split(",") if args.labels else None
    path = plot_runs(args.dirs, args.out, metric=args.metric, labels=labels, title=args.title)
    if not args.quiet:
        print(f"wrote {path}")
    return 0


COMMANDS = {
    "rebuild": _cmd_rebuild,
    "export": _cmd_export,
    "merge": _cmd_merge,
    "validate": _cmd_validate,
    "evolve": _cmd_evolve,
    "plot": _cmd_plot,
    "push": _cmd_push,
    "card": _cmd_card,
}


def _terminate(signum, frame):
    raise KeyboardInterrupt  # so SIGTERM cleans up temporary output like Ctrl-C does


def main(argv: Sequence[str] | None = None) -> int:
    # Large CPU tensors on transparent huge pages: fresh allocations fault 6-8x less (read by torch at first use).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    _setup_logging(args)
    signal.signal(signal.SIGTERM, _terminate)
    from hf_m2n2.errors import HfM2n2Error
    from hf_m2n2.hub_log import mask_secrets

    try:
        return COMMANDS[args.command](args)
    except OSError as exc:  # a full disk (or a file size limit) under any write: one line, as a user error
        where = getattr(args, "resume", None) or getattr(args, "out_dir", None) or getattr(args, "out", None)
        error = _storage_error(exc, where)
        if error is None:
            if isinstance(exc, HfM2n2Error):
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_USER_ERROR
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except HfM2n2Error as exc:
        print(f"error: {mask_secrets(str(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


def _storage_error(exc: OSError, where: str | None):
    """The one-line StorageError for a disk that refused a write (None for other OSErrors), naming the output
    being written (an OSError's own filename can be the source of a copy). An EIO naming a file outside the
    output and its temporaries was a read: it names that file (a seed, the HF cache)."""
    from hf_m2n2.errors import StorageError

    error = StorageError.of(exc)
    if error is None or not where:
        return error
    if isinstance(exc, StorageError):
        return error if error.filename else StorageError(f"{where}: {error}", error.errno, str(where))
    if exc.filename and not StorageError.is_write_side(exc) and not _in_output(str(exc.filename), str(where)):
        return StorageError(
            f"{exc.filename}: cannot read: {exc.strerror or exc}", exc.errno, str(exc.filename)
        )
    return StorageError(f"{where}: cannot write: {exc.strerror or exc}", exc.errno, str(where))


def _in_output(filename: str, where: str) -> bool:
    """Whether `filename` is under the output `where` or under one of its temporaries (`.OUT.tmp-PID-xxxx`)."""
    from pathlib import Path

    path, out = Path(filename).resolve(), Path(where).resolve()
    for part in (path, *path.parents):
        if part == out or (part.parent == out.parent and part.name.startswith(f".{out.name}.")):
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
