"""What a new user meets first: custom code that must never run unasked, tokens that must never be printed, Hub
errors that say what to do, cards whose usage snippet loads, tokenizer files that are really there."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SEQUENCES = [[1, 40 + i, 41 + i, 42 + i, 2] for i in range(4)]
LIKELIHOOD = {
    "kind": "python",
    "callable": "hf_m2n2.demo.tasks.likelihood:token_likelihood",
    "test_callable": "hf_m2n2.demo.tasks.likelihood:mean_likelihood",
    "kwargs": {"sequences": SEQUENCES},
}


def _evolve_spec(a, b, **extra) -> dict:
    return {
        "name": "m2n2",
        "models": [{"model": str(a)}, {"model": str(b)}],
        "genome": {"kind": "blend", "block_size": 4096},
        "evolve": {"algorithm": "m2n2", "budget": 3, "seed": 0},
        "evaluate": LIKELIHOOD,
        **extra,
    }


def test_evolve_card_usage_snippet_loads_the_output_directory(seeds, tmp_path, monkeypatch, cli):
    """The snippet named `from_pretrained("m2n2")` (the run's label): neither a path nor a repo id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(_evolve_spec(seeds["a"], seeds["b"])))
    code, _, err = cli("evolve", "spec.yaml", "--out", "runs/first", "--quiet")
    assert code == 0, err
    readme = (tmp_path / "runs/first/model/README.md").read_text()
    assert 'from_pretrained("runs/first/model")' in readme
    assert 'from_pretrained("m2n2"' not in readme
    AutoTokenizer.from_pretrained("runs/first/model", trust_remote_code=False)  # the snippet works as written
    AutoModelForCausalLM.from_pretrained("runs/first/model", trust_remote_code=False)


# ---------------------------------------------------------------------- custom code never runs unasked

MARKER_CODE = """
from pathlib import Path

Path({marker!r}).write_text("the seed's code ran")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


class MarkerConfig(LlamaConfig):
    model_type = "m2n2_marker"


class MarkerModel(LlamaForCausalLM):
    config_class = MarkerConfig


class MarkerTokenizer(PreTrainedTokenizerFast):
    pass
"""
TOKENIZER_CODE = {
    "tokenizer_class": "MarkerTokenizer",
    "auto_map": {"AutoTokenizer": [None, "marker.MarkerTokenizer"]},
}
CONFIG_CODE = {
    "model_type": "m2n2_marker",
    "auto_map": {"AutoConfig": "marker.MarkerConfig", "AutoModelForCausalLM": "marker.MarkerModel"},
}


def _custom_code_seed(
    src: Path, dst: Path, config: dict | None = None, tokenizer: dict | None = None
) -> Path:
    """A copy of a tiny seed whose files name `marker.py`, which writes `dst.ran` when executed."""
    shutil.copytree(src, dst)
    (dst / "marker.py").write_text(MARKER_CODE.format(marker=str(dst) + ".ran"))
    for name, change in (("config.json", config), ("tokenizer_config.json", tokenizer)):
        data = json.loads((dst / name).read_text())
        (dst / name).write_text(json.dumps({**data, **(change or {})}))
    return dst


def _tiny_lm_eval_task(folder: Path) -> dict:
    """An lm-eval generation task over four prompts (its YAML names the data by absolute path)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)))
    (folder / "tiny_add.yaml").write_text(
        "task: tiny_add\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 3\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return {"kind": "lm_eval", "include_path": str(folder), "tasks": ["tiny_add"], "metric": "exact_match"}


@pytest.fixture(scope="module")
def custom_seeds(seeds, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("custom_code")
    return {
        "tokenizer": _custom_code_seed(seeds["a"], root / "tok-code", tokenizer=TOKENIZER_CODE),
        "config": _custom_code_seed(
            seeds["a"], root / "cfg-code", config=CONFIG_CODE, tokenizer=TOKENIZER_CODE
        ),
        "task": _tiny_lm_eval_task(root / "tasks"),
    }


@pytest.mark.parametrize("variant", ["tokenizer", "config"])
@pytest.mark.parametrize("command", ["merge", "validate", "evolve"])
def test_seed_code_never_runs_without_the_opt_in(
    custom_seeds, seeds, variant, command, cli, tmp_path, monkeypatch
):
    """A "y" on stdin used to answer transformers' prompt and run the seed's marker.py."""
    seed = custom_seeds[variant]
    marker = Path(str(seed) + ".ran")
    marker.unlink(missing_ok=True)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\ny\n"))
    if command == "evolve":
        spec = _evolve_spec(seed, seeds["b"], evaluate=custom_seeds["task"])
        spec_path = tmp_path / "evolve.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        args = ["evolve", spec_path, "--out", tmp_path / "run"]
    else:
        merge_spec = {
            "merge_method": "linear",
            "models": [
                {"model": str(seed), "parameters": {"weight": 0.5}},
                {"model": str(seeds["b"]), "parameters": {"weight": 0.5}},
            ],
        }
        spec_path = tmp_path / "merge.yaml"
        spec_path.write_text(yaml.safe_dump(merge_spec))
        args = ["merge", spec_path, tmp_path / "merged"] if command == "merge" else ["validate", spec_path]
    code, out, err = cli(*args)
    file = "config.json" if variant == "config" else "tokenizer_config.json"
    assert code == 2, err
    assert err.strip().splitlines() == [
        f"error: {seed.name}: its {file} needs custom code ({', '.join(_refs(variant))}) that transformers "
        "would run; pass --trust-remote-code to allow it (only for code you trust)"
    ]
    assert "Do you wish to run the custom code" not in out + err
    assert not marker.exists()
    assert not (tmp_path / "merged").exists() and not (tmp_path / "run").exists()


def _refs(variant: str) -> list[str]:
    return (
        ["marker.MarkerConfig", "marker.MarkerModel"] if variant == "config" else ["marker.MarkerTokenizer"]
    )


def test_the_opt_in_lets_validate_accept_the_seed(custom_seeds, seeds, cli, tmp_path):
    spec = {
        "merge_method": "linear",
        "models": [{"model": str(custom_seeds["tokenizer"])}, {"model": str(seeds["b"])}],
        "parameters": {"weight": 0.5},
    }
    spec_path = tmp_path / "merge.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    code, _, err = cli("validate", spec_path, "--trust-remote-code")
    assert code == 0, err


def test_union_tokenizer_with_custom_code_is_one_line(custom_seeds, seeds):
    """tokenizer_source: union loads every tokenizer: transformers' refusal used to span three lines."""
    from hf_m2n2.errors import CheckpointError
    from hf_m2n2.seeds import open_seeds
    from hf_m2n2.vocab import load_tokenizer

    [seed] = open_seeds([str(custom_seeds["tokenizer"])])
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(seed, trust_remote_code=False)
    assert "\n" not in str(info.value)
    assert "tokenizer_config.json needs custom code (marker.MarkerTokenizer)" in str(info.value)
    assert "--trust-remote-code" in str(info.value)


def test_the_space_offers_the_same_opt_in(custom_seeds, seeds, tmp_path):
    """The Space's evolve spec carries the box's value; its merge job refuses the seed without it, allows it with."""
    from hf_m2n2.app.forms import FIELD, evolve_spec
    from hf_m2n2.app.jobs import Job, _merge_job
    from hf_m2n2.custom_code import CustomCodeError
    from hf_m2n2.evolve.spec import parse_evolve_spec

    assert FIELD["trust_remote_code"].default is False
    evaluate = {"kind": "lm_eval", "tasks": ["gsm8k"], "metric": "exact_match"}
    assert not parse_evolve_spec(
        evolve_spec("m2n2", ["org/a", "org/b"], evaluate, budget=4)
    ).trust_remote_code
    trusted = evolve_spec("m2n2", ["org/a", "org/b"], evaluate, budget=4, trust_remote_code=True)
    assert parse_evolve_spec(trusted).trust_remote_code
    refs = [str(custom_seeds["tokenizer"]), str(seeds["b"])]
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {"merge_method": "linear", "models": [{"model": r} for r in refs], "parameters": {"weight": 0.5}}
        )
    )
    with pytest.raises(CustomCodeError, match="tok-code: its tokenizer_config.json needs custom code"):
        _merge_job(spec_path, "merged", refs, None)(Job("merge", tmp_path, tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    _merge_job(spec_path, "merged", refs, None, trust_remote_code=True)(
        Job("merge", tmp_path, tmp_path / "merged")
    )
    assert (tmp_path / "merged" / "model.safetensors").is_file()


# ---------------------------------------------------------------------- the Hub client: tokens, offline, retries

SECRET = "secret-token-123"  # not of the hf_... form the old scrub matched


def _hf_m2n2(args: list, hub_url: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """`hf-m2n2 ARGS` in a child process talking to `hub_url` (online), with a private HF cache."""
    environment = {
        **os.environ,
        "HF_ENDPOINT": hub_url,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf_home"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        **env,
    }
    command = [sys.executable, "-m", "hf_m2n2.cli", *map(str, args)]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)


def test_a_token_echoed_by_the_endpoint_is_never_printed(seeds, tmp_path):
    """A proxy repeating the Authorization header in X-Error-Message, at -v: the token appears nowhere."""
    from hub_server import HubServer

    with HubServer(tmp_path / "hub", {SECRET: "alice"}) as server:
        server.echo_authorization = True
        server.fail("POST", r"^/api/repos/create", 500)
        result = _hf_m2n2(["push", seeds["a"], "alice/echoed", "-v"], server.url, tmp_path, HF_TOKEN=SECRET)
    assert result.returncode == 2, result.stderr
    assert "Authorization: Bearer <token>" in result.stderr  # the server's message, masked
    assert SECRET not in result.stdout + result.stderr


def test_the_log_filter_masks_the_token_in_any_form(caplog):
    import logging

    from hf_m2n2.hub_log import SecretFilter, add_secret, mask_secrets

    add_secret(SECRET)
    assert mask_secrets(f"Bearer {SECRET} and {HUB_SHAPED}") == "Bearer <token> and <token>"
    record = logging.LogRecord(
        "httpx", logging.DEBUG, __file__, 1, "headers: %s", (f"Bearer {SECRET}",), None
    )
    assert SecretFilter().filter(record) and record.getMessage() == "headers: Bearer <token>"


HUB_SHAPED = "hf_" + "aB3" * 11 + "x"  # a user token's shape: hf_ and 34 letters and digits


def test_the_mask_spares_the_projects_own_names():
    """`hf_[A-Za-z0-9_]{8,}` also matched hf_m2n2_build and .../hf_m2n2_runs/...: errors showed `<token>` there."""
    from hf_m2n2.hub_log import mask_secrets

    text = "/tmp/hf_m2n2_runs/run-0/model: cannot write (hf_m2n2_build, hf_m2n2_app)"
    assert mask_secrets(text) == text
    assert mask_secrets(f"401 for {HUB_SHAPED}.") == "401 for <token>."
    assert mask_secrets("Bearer hf_test_alice_0000", "hf_test_alice_0000") == "Bearer <token>"


def test_an_explicit_token_is_masked_during_its_call_only(seeds, hub):
    """push_folder(token=...) kept every token it was given (a Space visitor's) in a module-global set for the life
    of the process; it is masked while its call runs and forgotten afterwards."""
    from hf_m2n2.hub_log import mask_secrets, masking
    from hf_m2n2.push import push_folder

    token = hub.token_of("alice")  # not Hub-shaped: only the exact value masks it
    with masking(token):
        with masking(token):  # two pushes with one token: the first to finish does not unmask the other
            pass
        assert mask_secrets(f"Bearer {token}") == "Bearer <token>"
    push_folder(seeds["a"], "alice/forgotten", token=token, endpoint=hub.url)
    assert mask_secrets(f"Bearer {token}") == f"Bearer {token}"


def test_a_refused_seed_is_not_taken_for_a_disk_error(custom_seeds, seeds):
    """CustomCodeError was also a PermissionError, hence an OSError: `except OSError` (the CLI's disk-error
    branch, which does not mask tokens) caught it before the user-error branch."""
    from hf_m2n2.custom_code import CustomCodeError
    from hf_m2n2.seeds import open_seeds

    with pytest.raises(CustomCodeError) as info:
        open_seeds([str(custom_seeds["tokenizer"])], trust_remote_code=False)
    assert not isinstance(info.value, OSError)


def test_the_refused_tokenizer_of_an_evaluator_names_the_seed_by_its_reference(custom_seeds):
    """A Hub seed's directory is its snapshot sha: the refusal named `0123abc...`, not `org/name`."""
    from hf_m2n2.custom_code import CustomCodeError
    from hf_m2n2.evaluate.base import EvaluationContext

    context = EvaluationContext(reference_dir=custom_seeds["tokenizer"], reference_name="org/tok-code")
    with pytest.raises(CustomCodeError, match=r"^org/tok-code: its tokenizer_config.json needs custom code"):
        context.tokenizer()


def _method_run(seed, seeds, tmp_path, name, cli_flag: bool, **extra) -> Path:
    """A finished evomerge_ps run (method genome) over `seed` and ft-b, started with `--trust-remote-code` or
    with the spec's `trust_remote_code: true`."""
    from hf_m2n2.evolve.runs import start_runs

    spec = {
        "name": name,
        "models": [{"model": str(seed)}, {"model": str(seeds["b"])}],
        "genome": {
            "kind": "method",
            "method": "task_arithmetic",
            "base_model": str(seeds["base"]),
            "parameters": ["weight"],
        },
        "evolve": {"algorithm": "evomerge_ps", "budget": 2, "seed": 5},
        "evaluate": LIKELIHOOD,
        **extra,
    }
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    start_runs(tmp_path / f"{name}.yaml", tmp_path / name, progress=False, trust_remote_code=cli_flag)
    return tmp_path / name


def test_export_of_a_run_over_custom_code_seeds(custom_seeds, seeds, cli, tmp_path):
    """`hf-m2n2 export` merged again without trust_remote_code: runs over such seeds could not be exported. It
    honours the spec's `trust_remote_code: true`, and `--trust-remote-code` for runs started with the flag."""
    seed = custom_seeds["tokenizer"]
    by_spec = _method_run(seed, seeds, tmp_path, "by-spec", False, trust_remote_code=True)
    code, _, err = cli("export", by_spec, tmp_path / "exported-spec", "--quiet")
    assert code == 0, err
    assert (tmp_path / "exported-spec" / "model.safetensors").read_bytes() == (
        by_spec / "model" / "model.safetensors"
    ).read_bytes()

    by_flag = _method_run(seed, seeds, tmp_path, "by-flag", True)
    code, _, err = cli("export", by_flag, tmp_path / "refused", "--quiet")
    assert code == 2 and "needs custom code" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "refused").exists()
    code, _, err = cli("export", by_flag, tmp_path / "exported-flag", "--quiet", "--trust-remote-code")
    assert code == 0, err
    assert (tmp_path / "exported-flag" / "model.safetensors").is_file()


def test_push_while_offline_names_the_variable(seeds, cli):
    code, _, err = cli("push", seeds["a"], "alice/offline")  # the test session runs with HF_HUB_OFFLINE=1
    assert code == 2
    assert err.strip() == "error: alice/offline: HF_HUB_OFFLINE=1 is set: unset it to push (nothing was sent)"


def test_hub_retries_are_said_once(seeds, tmp_path):
    """huggingface_hub logs two warnings per retry, and its own handler plus ours printed each twice."""
    from hub_server import TEST_TOKENS, HubServer

    with HubServer(tmp_path / "hub", TEST_TOKENS) as server:
        server.publish("alice/tiny", seeds["a"], next(iter(TEST_TOKENS)))
        server.fail("GET", r"/tree/", 503, times=2)  # snapshot_download's listing: retried after 1 s, 2 s
        spec = tmp_path / "spec.yaml"
        spec.write_text(
            yaml.safe_dump(
                {
                    "merge_method": "linear",
                    "models": [{"model": "alice/tiny"}, {"model": str(seeds["b"])}],
                    "parameters": {"weight": 0.5},
                }
            )
        )
        result = _hf_m2n2(["validate", spec], server.url, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "503" in line or "etry" in line]  # not the bars
    host = server.url.removeprefix("http://")
    assert lines == [
        f"WARNING: {host} failed (HTTP 503); retrying for up to ~25 s (HF_HUB_OFFLINE=1 skips the Hub)"
    ]


def test_a_dead_endpoint_fails_fast_in_one_line(seeds, tmp_path):
    """The safetensors probe used to back off ~23 s (list_repo_files) before the resolution error."""
    import socket
    import time

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [{"model": "someorg/absent"}, {"model": str(seeds["b"])}],
                "parameters": {"weight": 0.5},
            }
        )
    )
    started = time.perf_counter()
    result = _hf_m2n2(["validate", spec], f"http://127.0.0.1:{port}", tmp_path)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 2 and lines[-1].startswith("error: someorg/absent: not found locally"), lines
    assert len(set(lines)) == len(lines) and "Retrying in" not in result.stderr
    assert elapsed < 20, elapsed


# ---------------------------------------------------------------------- tokenizer files that are really there


@pytest.mark.parametrize("link", ["dangling", "looping"])
def test_a_broken_tokenizer_symlink_is_an_error_naming_the_file(seeds, link, cli, tmp_path):
    """It used to be skipped: exit 0 and a merged model whose tokenizer does not load."""
    seed = shutil.copytree(seeds["a"], tmp_path / "seed")
    (seed / "tokenizer.json").unlink()
    target = tmp_path / "nowhere.json" if link == "dangling" else seed / "tokenizer.json"
    (seed / "tokenizer.json").symlink_to(target)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "base_model": str(seed),
                "models": [{"model": str(seed)}, {"model": str(seeds["b"])}],
                "parameters": {"weight": 0.5},
            }
        )
    )
    code, _, err = cli("merge", spec, tmp_path / "merged", "--quiet")
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: {seed / 'tokenizer.json'}: a broken symlink (its target is missing or loops); "
        "the tokenizer cannot be copied"
    ]
    assert not (tmp_path / "merged").exists()


# ---------------------------------------------------------------------- lm-eval: only what the user can act on


def test_evolve_with_lm_eval_prints_no_warning_about_handing_hflm_a_model(
    custom_seeds, seeds, tmp_path, caplog
):
    """HFLM warned twice per run that it was handed a model object, which is how hf-m2n2 uses it."""
    import logging

    from hf_m2n2.evolve.runs import start_runs

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_evolve_spec(seeds["a"], seeds["b"], evaluate=custom_seeds["task"])))
    with caplog.at_level(logging.WARNING):
        start_runs(spec, tmp_path / "run", progress=False)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval")]
    assert not [m for m in messages if "`pretrained` model kwarg" in m or "already-initialized model" in m]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_evolve_runs_the_seed_code_only_with_the_opt_in(custom_seeds, seeds, cli, tmp_path):
    """--trust-remote-code is honoured: the lm-eval evaluator loads the seed's tokenizer class (its code runs)."""
    seed = custom_seeds["tokenizer"]
    marker = Path(str(seed) + ".ran")
    marker.unlink(missing_ok=True)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(_evolve_spec(seed, seeds["b"], evaluate=custom_seeds["task"])))
    code, _, err = cli("evolve", spec, "--out", tmp_path / "run", "--quiet", "--trust-remote-code")
    assert code == 0, err
    assert marker.exists()
