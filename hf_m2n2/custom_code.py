"""Seeds that ship their own Python code, refused unless the user opts in.

A model's `config.json` or `tokenizer_config.json` may name Python files (`auto_map`) that transformers imports,
that is runs, to load it; a diffusers pipeline's `model_index.json` may name its own pipeline class
(`_class_name: [MODULE, CLASS]`, JSDXL's) or a component class (`[MODULE, CLASS]` with `COMPONENT/MODULE.py`) that
diffusers imports, and its components' configs and tokenizers may have an `auto_map`. Asked with `trust_remote_code=None`, transformers prompts on stdin, and whatever answers
"y" runs the seed's code. hf-m2n2 passes `trust_remote_code` explicitly to every loader and checks seeds up
front: without the opt-in (`--trust-remote-code`, `trust_remote_code: true` in an evolve spec, the Space's
checkbox), a seed that needs its code is one line and exit 2, before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hf_m2n2.errors import CheckpointError

OPT_IN = "pass --trust-remote-code to allow it (only for code you trust)"
CODE_FILES = ("config.json", "tokenizer_config.json")
PIPELINE_INDEX = "model_index.json"


class CustomCodeError(CheckpointError):
    """A seed needs its own Python code to load and the user did not allow it. Not an OSError (no PermissionError
    base): handlers of disk errors must not take it for one.

    Attributes:
        seed: the seed's name.
        file: the file naming the code (`config.json`, `tokenizer_config.json`).
        refs: what its `auto_map` names (`module.Class`).
    """

    def __init__(self, seed: str, file: str, refs: list[str], runner: str = "transformers"):
        self.seed, self.file, self.refs = seed, file, refs
        named = f" ({', '.join(refs)})" if refs else ""
        super().__init__(f"{seed}: its {file} needs custom code{named} that {runner} would run; {OPT_IN}")


def declared_code(path: Path) -> list[str]:
    """The `module.Class` references of a JSON file's `auto_map` (empty: none, or no such file)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    auto_map = data.get("auto_map") if isinstance(data, dict) else None
    values = auto_map.values() if isinstance(auto_map, dict) else auto_map or []
    refs: list[str] = []
    for value in values:
        for ref in value if isinstance(value, list | tuple) else [value]:
            if isinstance(ref, str) and ref not in refs:
                refs.append(ref)
    return refs


def is_custom_code_error(exc: BaseException) -> bool:
    """Whether transformers refused to load because the files need their code (its ValueError names the flag)."""
    return isinstance(exc, ValueError) and "trust_remote_code" in str(exc)


def refusal(directory: str | Path, seed: str) -> CustomCodeError:
    """The one-line error for a seed transformers refused for its custom code (naming the file that asks)."""
    for file in reversed(CODE_FILES):  # the tokenizer's code is what is usually refused
        refs = declared_code(Path(directory) / file)
        if refs:
            return CustomCodeError(seed, file, refs)
    return CustomCodeError(seed, "config.json", [])


def check_custom_code(directory: str | Path, seed: str, trust_remote_code: bool) -> None:
    """Refuse a seed whose config or tokenizer transformers can only load by running the seed's code.

    Files whose `auto_map` names code that transformers does not need (its own classes load them, e.g. a known
    `model_type`) pass: transformers itself is asked, with `trust_remote_code=False`, which never runs the code.

    Raises:
        CustomCodeError: naming the seed, the file and the code, unless `trust_remote_code`.

    Example:
        >>> check_custom_code("seeds/tiny", "tiny", trust_remote_code=False)
    """
    if trust_remote_code:
        return
    directory = Path(directory)
    folders = [""]
    if (directory / PIPELINE_INDEX).is_file():  # a pipeline: its own code, then each component's files
        refs = pipeline_code(directory)
        if refs:
            raise CustomCodeError(seed, PIPELINE_INDEX, refs, runner="diffusers")
        folders = sorted(p.name for p in directory.iterdir() if p.is_dir())
    loaders: dict[str, Callable[[str], Any]] = {"config.json": _config, "tokenizer_config.json": _tokenizer}
    for folder in folders:
        for file in CODE_FILES:
            refs = declared_code(directory / folder / file)
            if refs and _refused(loaders[file], directory / folder):
                raise CustomCodeError(seed, f"{folder}/{file}" if folder else file, refs)


def pipeline_code(directory: str | Path) -> list[str]:
    """The code a diffusers pipeline folder's model_index.json makes diffusers import: its pipeline class
    (`_class_name: [MODULE, CLASS]`, loaded from `MODULE.py`) and custom component classes (`COMPONENT:
    [MODULE, CLASS]` with `COMPONENT/MODULE.py`), as `MODULE.CLASS`; empty for a pipeline of library classes.

    Example:
        >>> pipeline_code("jsdxl")  # doctest: +SKIP
        ['pipeline_japanese_stable_diffusion_xl.JapaneseStableDiffusionXLPipeline']
    """
    directory = Path(directory)
    try:
        index = json.loads((directory / PIPELINE_INDEX).read_text())
    except (OSError, ValueError):
        return []  # read (and reported) when the seed is opened
    refs = []
    for name, value in index.items() if isinstance(index, dict) else ():
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
            continue
        module, class_name = value
        if name == "_class_name" or (
            not name.startswith("_") and (directory / name / f"{module}.py").is_file()
        ):
            refs.append(f"{module}.{class_name}")
    return refs


def _refused(load: Callable[[str], Any], directory: Path) -> bool:
    try:
        load(str(directory))
    except Exception as exc:  # other problems are reported by the load that needs the files
        return is_custom_code_error(exc)
    return False


def _config(directory: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(directory, trust_remote_code=False)


def _tokenizer(directory: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
