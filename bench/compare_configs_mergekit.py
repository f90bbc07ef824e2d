"""Run mergekit's own example and test configs through mergekit 0.1.5 and hf-m2n2 and compare the outputs.

The configs are mergekit's `examples/*.yml` and the configs its test suite builds, listed with their origin in
`bench/mergekit_parity_configs.yaml`. Each is rendered onto tiny local Llamas built here (the model names in the
config replaced by local paths, nothing else changed), then merged by `mergekit-yaml` (with mergekit's own
interpreter: never installed into the project's environment) and by `hf-m2n2 merge`, each in its own
subprocess with one torch thread. Every tensor of the two outputs is compared (names, shapes, dtypes, values:
bit-exact expected; differences of at most one unit in the last place of a 16-bit dtype are reported
apart), as are config.json's layer count, vocabulary size and dtype, the tokenizer's vocabulary and the chat
template.

Run from the repo root (about 3 minutes on 2 cores):

    .venv/bin/python bench/compare_configs_mergekit.py [--mergekit-python .venv-mergekit/bin/python]
        [--repo DIR] [--only NAME,...] [--keep DIR] [--list]

Prints one line per config (name, origin, verdict) and the total "N of M agree". Known differences get their
own verdicts, each checked rather than assumed: mergekit's float32 output for some methods (compared after
casting it to the requested dtype), selections that differ only at cut-off ties (TIES magnitudes; SCE variances,
where mergekit's tensor is reproduced from torch.topk's choice), randomized methods. Exit status 0 when all agree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's hf_m2n2 (the SCE tie check)
from mergekit_parity_models import build_models  # noqa: E402
from mergekit_parity_ties import differs_only_at_ties, sce_differs_only_at_variance_ties  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE / "mergekit_parity_configs.yaml"
REPO = HERE.parent
RANDOMIZED = {"dare_ties", "dare_linear", "della", "della_linear"}
CONFIG_KEYS = ("num_hidden_layers", "vocab_size", "dtype")
OTHER_LABELS = {
    "cast": "agree once mergekit's float32 output is cast to the requested dtype",
    "ties": "differ only at selection cut-off ties",
}
MERGEKIT_ENTRY = ("mergekit.scripts.run_yaml:main", ["mergekit.merge", "mergekit.tokenizer", "transformers"])
OURS_ENTRY = ("hf_m2n2.cli:main", ["hf_m2n2.merge", "transformers", "safetensors.torch"])


@dataclass
class Run:
    """One tool's merge of one config."""

    returncode: int
    seconds: float
    log: str

    def error_line(self) -> str:
        """The one line that says why the run failed: hf-m2n2's `error: ...`, else the traceback's last line."""
        lines = [line.strip() for line in self.log.splitlines()[1:] if line.strip()]  # [0]: the command
        for line in reversed(lines):
            if line.startswith("error:"):
                return line[len("error:") :].strip()
        return lines[-1] if lines else f"exit status {self.returncode}"


@dataclass
class Comparison:
    """Differences between mergekit's output and ours; all empty means they agree."""

    structure: list[str] = field(default_factory=list)  # names, shapes, dtypes, config.json, tokenizer
    values: list[tuple[float, str]] = field(default_factory=list)  # (max |diff|, description) per tensor
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # differing elements of those tensors
    ulp_tensors: list[str] = field(default_factory=list)  # differ by exactly one unit in a 16-bit dtype
    cast_tensors: list[str] = field(
        default_factory=list
    )  # mergekit's float32, compared cast to the requested dtype

    def describe(self) -> str:
        parts = list(self.structure)
        if self.values:
            top = sorted(self.values, reverse=True)[:2]
            parts.append(f"{len(self.values)} tensors differ; " + "; ".join(text for _, text in top))
        return " | ".join(parts)


# ---------------------------------------------------------------- rendering


def model_names_in(value: Any, known: dict[str, Any]) -> set[str]:
    """Every string in a config (values only, at any depth) that names a known model."""
    if isinstance(value, dict):
        return set().union(*(model_names_in(v, known) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(model_names_in(v, known) for v in value)) if value else set()
    return {value} if isinstance(value, str) and value in known else set()


def render(value: Any, paths: dict[str, Path]) -> Any:
    """The config with every model name replaced by its local directory, everything else as it is."""
    if isinstance(value, dict):
        return {k: render(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, paths) for v in value]
    if isinstance(value, str) and value in paths:
        return str(paths[value])
    return value


# ---------------------------------------------------------------- running


class ToolRunner:
    """One tool's fork server (bench/fork_runner.py): its imports are paid once, each merge runs in its own child."""

    def __init__(self, python: str, entry: str, preload: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [python, str(HERE / "fork_runner.py"), entry, *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.pool = ThreadPoolExecutor(max_workers=1)  # one merge at a time per tool, in submission order

    def submit(self, argv: list[str], log: Path, timeout: float) -> Future[Run]:
        return self.pool.submit(self._run, argv, log, timeout)

    def _run(self, argv: list[str], log: Path, timeout: float) -> Run:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"argv": argv, "log": str(log), "timeout": timeout}) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the fork runner for {argv} died (exit {self.process.wait()})")
        result = json.loads(answer)
        return Run(result["returncode"], result["seconds"], log.read_text(errors="replace"))

    def close(self) -> None:
        self.pool.shutdown()
        if self.process.stdin:
            self.process.stdin.close()
        self.process.wait()


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


# ---------------------------------------------------------------- comparing


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element, how many representable values of the dtype lie between a and b (sign-magnitude order)."""
    int_type, bits = {2: (torch.int16, 16), 4: (torch.int32, 32), 8: (torch.int64, 64)}[a.element_size()]

    def ordered(t: torch.Tensor) -> torch.Tensor:
        raw = t.contiguous().view(int_type).to(torch.int64)
        magnitude = raw & ((1 << (bits - 1)) - 1)
        return torch.where(raw < 0, -magnitude, magnitude)

    return (ordered(a) - ordered(b)).abs()


def compare_tensors(
    ref: dict[str, torch.Tensor],
    ours: dict[str, torch.Tensor],
    out: Comparison,
    requested: torch.dtype | None = None,
) -> None:
    """Compare tensor by tensor into `out`. Where mergekit wrote float32 and ours is the `requested` dtype (its
    documented float32 output for some methods), mergekit's tensor is cast to ours and the values compared."""
    if not ref or not ours:  # two empty outputs must not count as agreeing
        out.structure.append(f"no tensors in {'mergekit' if not ref else 'our'} output")
    missing, extra = sorted(set(ref) - set(ours)), sorted(set(ours) - set(ref))
    if missing:
        out.structure.append(f"{len(missing)} tensors missing in ours (e.g. {missing[0]})")
    if extra:
        out.structure.append(f"{len(extra)} tensors only in ours (e.g. {extra[0]})")
    for name in sorted(set(ref) & set(ours)):
        a, b = ref[name], ours[name]
        if a.shape == b.shape and a.dtype == torch.float32 and b.dtype == requested != a.dtype:
            a = a.to(b.dtype)
            out.cast_tensors.append(name)
        if a.shape != b.shape:
            out.structure.append(f"{name}: shape {tuple(b.shape)} vs mergekit {tuple(a.shape)}")
        elif a.dtype != b.dtype:
            out.structure.append(f"{name}: dtype {b.dtype} vs mergekit {a.dtype}")
        else:
            ulps = ulp_distance(a, b)
            if not bool(ulps.any()):
                continue
            if a.element_size() == 2 and int(ulps.max()) <= 1:
                out.ulp_tensors.append(name)
                continue
            max_diff = float((a.double() - b.double()).abs().max())
            count = int((ulps > 0).sum())
            where = f"{count}/{a.numel()} elements"
            if a.dim() == 2 and ("embed" in name or "lm_head" in name):  # vocabulary rows: say which tokens
                rows = (ulps > 0).any(dim=1).nonzero().flatten().tolist()
                where += f", rows {rows}" if len(rows) <= 6 else f", {len(rows)}/{a.shape[0]} rows"
            out.values.append((max_diff, f"{name}: max|diff| {max_diff:.3g} at {where}"))
            out.masks[name] = ulps > 0


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def config_values(directory: Path) -> dict[str, Any]:
    config = read_json(directory / "config.json")
    config.setdefault("dtype", config.get("torch_dtype"))
    return {key: config.get(key) for key in CONFIG_KEYS}


def tokenizer_view(directory: Path) -> tuple[dict[str, int] | None, str | None]:
    """(vocabulary with added tokens, chat template) of an output directory; None where absent."""
    vocab = None
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab(with_added_tokens=True)
    if (directory / "chat_template.jinja").is_file():
        return vocab, (directory / "chat_template.jinja").read_text()
    return vocab, read_json(directory / "tokenizer_config.json").get("chat_template")


def render_chat(directory: Path) -> str:
    """The output's chat template applied (by transformers) to a fixed two-turn conversation."""
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def requested_dtype(config: dict[str, Any]) -> torch.dtype | None:
    name = config.get("out_dtype") or config.get("dtype")
    return getattr(torch, name) if name in ("float32", "float16", "bfloat16") else None


def compare_outputs(ref_dir: Path, ours_dir: Path, requested: torch.dtype | None = None) -> Comparison:
    out = Comparison()
    compare_tensors(load_tensors(ref_dir), load_tensors(ours_dir), out, requested)
    ref_config, ours_config = config_values(ref_dir), config_values(ours_dir)
    for key in CONFIG_KEYS:
        if ref_config[key] != ours_config[key]:
            out.structure.append(f"config.json {key}: {ours_config[key]} vs mergekit {ref_config[key]}")
    (ref_vocab, ref_template), (ours_vocab, ours_template) = tokenizer_view(ref_dir), tokenizer_view(ours_dir)
    if ref_vocab != ours_vocab:
        if ref_vocab is None or ours_vocab is None:
            out.structure.append(f"tokenizer only in {'ours' if ref_vocab is None else 'mergekit'}'s output")
        else:
            only_ref = sorted(set(ref_vocab) - set(ours_vocab), key=ref_vocab.get)
            only_ours = sorted(set(ours_vocab) - set(ref_vocab), key=ours_vocab.get)
            moved = sum(ref_vocab[t] != ours_vocab[t] for t in set(ref_vocab) & set(ours_vocab))
            out.structure.append(
                f"vocab {len(ours_vocab)} tokens vs mergekit {len(ref_vocab)} "
                f"(only mergekit: {only_ref[:4]}, only ours: {only_ours[:4]}, other ids: {moved})"
            )
    if (ref_template or None) != (ours_template or None):
        if ref_template is None or ours_template is None:
            out.structure.append(f"chat template {_short(ours_template)} vs mergekit {_short(ref_template)}")
        elif render_chat(ref_dir) != render_chat(ours_dir):  # texts differ: compare what users get
            rendered = render_chat(ours_dir), render_chat(ref_dir)
            out.structure.append(f"rendered chat {_short(rendered[0])} vs mergekit {_short(rendered[1])}")
    return out


def _short(text: str | None) -> str:
    if text is None:
        return "none"
    return repr(text if len(text) <= 40 else text[:37] + "...")


# ---------------------------------------------------------------- verdicts


def verdict(
    entry: dict[str, Any], rendered: dict[str, Any], mergekit: Run, ours: Run, ref_dir: Path, ours_dir: Path
) -> tuple[str, str]:
    """(kind, text): kind is agree | ulp | cast | ties | random | differ | refused | crashed | mergekit-failed."""
    if entry.get("expect_error"):
        if mergekit.returncode == 0:
            return "mergekit-failed", "mergekit accepted a config its test expects it to refuse"
        if ours.returncode != 0:
            return "agree", f"both refuse (ours: {ours.error_line()})"
        return "differ", f"ours accepts what mergekit refuses ({mergekit.error_line()})"
    if mergekit.returncode != 0:
        suffix = "" if ours.returncode == 0 else f"; ours also fails: {ours.error_line()}"
        return "mergekit-failed", f"mergekit failed: {mergekit.error_line()}{suffix}"
    if ours.returncode == 2:
        return "refused", f"ours refused: {ours.error_line()}"
    if ours.returncode != 0:
        return "crashed", f"ours crashed (exit {ours.returncode}): {ours.error_line()}"
    result = compare_outputs(ref_dir, ours_dir, requested_dtype(rendered))
    cast = f" (mergekit's float32 output cast to the requested dtype in {len(result.cast_tensors)} tensors)"
    cast = cast if result.cast_tensors else ""
    if result.structure or result.values:
        text = result.describe() + cast
        method = entry["config"].get("merge_method")
        if method in RANDOMIZED and not result.structure:
            return "random", f"differ: {text} [randomized method: each tool draws its masks from its own RNG]"
        if not result.structure and differs_only_at_ties(rendered, result.masks):
            count = sum(int(mask.sum()) for mask in result.masks.values())
            return (
                "ties",
                f"differ only at TIES cut-off magnitude ties ({count} elements in {len(result.masks)} tensors)",
            )
        if not result.structure and sce_differs_only_at_variance_ties(rendered, ref_dir, result.masks):
            count = sum(int(mask.sum()) for mask in result.masks.values())
            return "ties", (
                f"differ only at SCE variance ties ({len(result.masks)} tensors, {count} elements: mergekit's "
                "torch.topk keeps other tied positions, which moves the energy weights; reproduced bit for bit)"
            )
        return "differ", f"differ: {text}"
    if result.cast_tensors:
        ulp = f", {len(result.ulp_tensors)} of them within one 16-bit ulp" if result.ulp_tensors else ""
        return "cast", (
            "agree after mergekit's float32 output is cast to the requested dtype (documented difference; "
            f"{len(result.cast_tensors)} tensors{ulp})"
        )
    if result.ulp_tensors:
        return "ulp", f"agree within one ulp ({len(result.ulp_tensors)} tensors differ by 1 ulp)"
    return "agree", "agree"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated config names (default: all)")
    parser.add_argument(
        "--keep", metavar="DIR", help="keep models, rendered configs, outputs and logs in DIR"
    )
    parser.add_argument("--repo", default=str(REPO), help="the hf-m2n2 checkout to run (default: this one)")
    parser.add_argument(
        "--ours-python",
        default=sys.executable,
        help="python that runs hf-m2n2, with PYTHONPATH set to --repo (default: this one)",
    )
    parser.add_argument(
        "--mergekit-python",
        help="python with mergekit 0.1.5 (default: .venv-mergekit in --repo or this repo, else mergekit-yaml's on PATH)",
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds per merge (default 300)")
    parser.add_argument("--list", action="store_true", help="list the configs and exit")
    return parser.parse_args(argv)


def default_mergekit_python(repo: Path) -> str | None:
    candidates = [root / ".venv-mergekit" / "bin" / "python" for root in (repo, REPO)]
    if shutil.which("mergekit-yaml"):
        candidates.append(Path(shutil.which("mergekit-yaml")).parent / "python")
    return next((str(c) for c in candidates if c.is_file()), None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.mergekit_python = args.mergekit_python or default_mergekit_python(Path(args.repo))
    if args.mergekit_python is None:
        print(
            "error: no mergekit found: pass --mergekit-python (a python with mergekit 0.1.5)", file=sys.stderr
        )
        return 2
    data = yaml.safe_load(DATA.read_text())
    entries = data["configs"]
    if args.list:
        for entry in entries:
            print(f"{entry['name']:26s} {entry['origin']}")
        return 0
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {e["name"] for e in entries})
        if unknown:
            print(f"error: unknown config name(s) {unknown}; see --list", file=sys.stderr)
            return 2
        entries = [e for e in entries if e["name"] in wanted]

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mergekit_parity_"))
    for sub in ("configs", "mergekit", "ours", "logs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    names = sorted(set().union(*(model_names_in(e["config"], data["models"]) for e in entries)))
    torch.set_num_threads(1)
    start = time.perf_counter()
    paths = build_models(work / "models", names, data["models"])
    print(f"{len(paths)} tiny models ready in {time.perf_counter() - start:.1f} s under {work / 'models'}")

    env = base_env()
    mergekit = ToolRunner(args.mergekit_python, *MERGEKIT_ENTRY, env)
    ours = ToolRunner(args.ours_python, *OURS_ENTRY, {**env, "PYTHONPATH": str(Path(args.repo).resolve())})
    runs: dict[str, tuple[Future[Run], Future[Run]]] = {}
    rendered: dict[str, dict[str, Any]] = {}
    for entry in entries:
        name = entry["name"]
        config = work / "configs" / f"{name}.yaml"
        rendered[name] = render(entry["config"], paths)
        config.write_text(yaml.safe_dump(rendered[name], sort_keys=False))
        mk_out, ours_out = work / "mergekit" / name, work / "ours" / name
        for out in (mk_out, ours_out):
            shutil.rmtree(out, ignore_errors=True)
        seed = ["--random-seed", "0"]
        runs[name] = (
            mergekit.submit(
                [str(config), str(mk_out), *seed, "--quiet"],
                work / "logs" / f"{name}.mergekit.log",
                args.timeout,
            ),
            ours.submit(
                ["merge", str(config), str(ours_out), *seed], work / "logs" / f"{name}.ours.log", args.timeout
            ),
        )
    counts: dict[str, int] = {}
    try:
        for entry in entries:
            name = entry["name"]
            mk_run, ours_run = (future.result() for future in runs[name])
            kind, text = verdict(
                entry, rendered[name], mk_run, ours_run, work / "mergekit" / name, work / "ours" / name
            )
            counts[kind] = counts.get(kind, 0) + 1
            print(f"{name:26s} {entry['origin']:58s} {text}", flush=True)
    finally:
        mergekit.close()
        ours.close()

    agree = counts.get("agree", 0) + counts.get("ulp", 0)
    others = ", ".join(
        f"{OTHER_LABELS.get(k, k)} {v}" for k, v in sorted(counts.items()) if k not in ("agree", "ulp")
    )
    print(
        f"{agree} of {len(entries)} agree ({counts.get('agree', 0)} bit for bit, {counts.get('ulp', 0)} within "
        f"one 16-bit ulp); {others or 'no others'}; {time.perf_counter() - start:.0f} s"
    )
    if args.keep:
        print(f"configs, outputs and logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if agree == len(entries) else 1


if __name__ == "__main__":
    sys.exit(main())
