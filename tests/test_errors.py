"""Bad input: a clear one-line error naming the problem, exit status 2, and nothing written."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import copy_seed


def _fails(cli, tmp_path, *args, expect: str) -> str:
    out = tmp_path / "out"
    code, _, stderr = cli("merge", *args, out, "--quiet")
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expect in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "temporary output left behind"
    return lines[0]


def _ties(seeds, **overrides):
    spec = {
        "merge_method": "ties",
        "base_model": str(seeds["base"]),
        "models": [
            {"model": str(seeds["a"]), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": str(seeds["b"]), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
    }
    spec.update(overrides)
    return spec


def test_malformed_yaml(write_spec, cli, tmp_path):
    _fails(
        cli, tmp_path, write_spec("merge_method: linear\nmodels: [\n  - model: x\n"), expect="malformed YAML"
    )


def test_unknown_method(seeds, write_spec, cli, tmp_path):
    _fails(cli, tmp_path, write_spec(_ties(seeds, merge_method="tie")), expect="unknown merge method 'tie'")


def test_unknown_key_names_its_path(seeds, write_spec, cli, tmp_path):
    spec = _ties(seeds)
    spec["models"][1]["paramters"] = {"weight": 1}
    _fails(cli, tmp_path, write_spec(spec), expect="models[1].paramters: unknown key")


def test_misspelled_top_level_key_is_named_before_the_key_it_hides(seeds, write_spec, cli, tmp_path):
    spec = _ties(seeds)
    spec["merge_methd"] = spec.pop("merge_method")
    _fails(cli, tmp_path, write_spec(spec), expect="merge_methd: unknown key (did you mean merge_method?)")


def test_no_models_is_a_one_line_error(write_spec, cli, tmp_path):
    _fails(cli, tmp_path, write_spec("merge_method: linear\nmodels: []\n"), expect="models: List should have")


def test_an_unknown_flag_is_reported_with_the_commands_usage(write_spec, cli, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli("merge", write_spec("merge_method: linear\n"), tmp_path / "out", "--cuda")
    err = capsys.readouterr().err
    assert info.value.code == 2 and "usage: hf-m2n2 merge" in err
    assert "hf-m2n2 merge: error: unrecognized arguments: --cuda" in err


def test_missing_required_parameter(seeds, write_spec, cli, tmp_path):
    spec = _ties(seeds)
    del spec["models"][1]["parameters"]["weight"]
    _fails(cli, tmp_path, write_spec(spec), expect="models[1].parameters.weight: required by ties")


def test_missing_base_model(seeds, write_spec, cli, tmp_path):
    spec = _ties(seeds)
    del spec["base_model"]
    _fails(cli, tmp_path, write_spec(spec), expect="base_model: required by ties")


def test_model_directory_missing(seeds, write_spec, cli, tmp_path):
    spec = _ties(seeds)
    spec["models"][0]["model"] = str(tmp_path / "no-such-model")
    _fails(cli, tmp_path, write_spec(spec), expect="does not exist")


def test_repo_not_in_offline_cache(seeds, write_spec, cli, tmp_path):
    spec = _ties(seeds)
    spec["models"][0]["model"] = "nobody/not-cached-model"
    _fails(cli, tmp_path, write_spec(spec), expect="nobody/not-cached-model: not found locally")


def test_revision_not_found(seeds, write_spec, cli, tmp_path, cached_repo):
    spec = _ties(seeds)
    spec["models"][0]["model"] = f"{cached_repo['repo_id']}@no-such-branch"
    _fails(cli, tmp_path, write_spec(spec), expect="revision 'no-such-branch' not found")


def test_architectures_differ(seeds, write_spec, cli, tmp_path):
    spec = {
        "merge_method": "linear",
        "models": [
            {"model": str(seeds["a"]), "parameters": {"weight": 1}},
            {"model": str(seeds["gpt2"]), "parameters": {"weight": 1}},
        ],
    }
    _fails(cli, tmp_path, write_spec(spec), expect="different architectures")


def test_shapes_differ_even_with_crimes(seeds, write_spec, cli, tmp_path):
    spec = {
        "merge_method": "linear",
        "models": [
            {"model": str(seeds["a"]), "parameters": {"weight": 1}},
            {"model": str(seeds["narrow"]), "parameters": {"weight": 1}},
        ],
    }
    _fails(cli, tmp_path, write_spec(spec), "--allow-crimes", expect="has different shapes")


def test_tensor_missing_in_one_seed(seeds, write_spec, cli, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = copy_seed(seeds["b"], tmp_path / "broken")
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    spec = _ties(seeds)
    spec["models"][1]["model"] = str(broken)
    _fails(
        cli,
        tmp_path,
        write_spec(spec),
        expect="'model.layers.1.mlp.up_proj.weight' is missing in seed broken",
    )


@pytest.mark.parametrize("damage", ["header", "truncated"])
def test_corrupted_safetensors(seeds, write_spec, cli, tmp_path, damage):
    broken = copy_seed(seeds["b"], tmp_path / "broken")
    file = broken / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:8] + b"{not json" + data[17:] if damage == "header" else data[: len(data) // 2])
    spec = _ties(seeds)
    spec["models"][1]["model"] = str(broken)
    line = _fails(cli, tmp_path, write_spec(spec), expect=str(file))
    assert "corrupted or truncated" in line


def test_nonfinite_seed_refused_unless_allowed(seeds, write_spec, cli, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = copy_seed(seeds["b"], tmp_path / "nan-seed")
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    spec = {
        "merge_method": "linear",
        "models": [
            {"model": str(seeds["a"]), "parameters": {"weight": 1}},
            {"model": str(broken), "parameters": {"weight": 1}},
        ],
    }
    path = write_spec(spec)
    _fails(cli, tmp_path, path, expect="'model.norm.weight' contains NaN or Inf")
    code, _, stderr = cli("merge", path, tmp_path / "out", "--quiet", "--allow-nonfinite")
    assert code == 0, stderr


def test_out_dir_exists_needs_overwrite(seeds, write_spec, cli, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    code, _, stderr = cli("merge", write_spec(_ties(seeds)), out, "--quiet")
    assert code == 2 and "already exists" in stderr
    assert (out / "keep.txt").read_text() == "previous result"
    code, _, stderr = cli("merge", write_spec(_ties(seeds)), out, "--quiet", "--overwrite")
    assert code == 0, stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "spec.yaml"]


def test_write_error_mid_merge_removes_temporary_dir(seeds, write_spec, tmp_path):
    """A real EFBIG from the kernel (file size limit) partway through the shards: exit 2, nothing left."""
    import resource

    spec = write_spec(_ties(seeds))
    out = tmp_path / "out"

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_m2n2.cli",
            "merge",
            str(spec),
            str(out),
            "--quiet",
            "--out-shard-size",
            "100KB",
        ],
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {out}: writing model-") and "File too large" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy_format", [False, True])
def test_bin_with_pickled_code_is_refused_not_executed(seeds, write_spec, cli, tmp_path, legacy_format):
    from safetensors.torch import load_file

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((seeds["b"] / "config.json").read_text())
    state = load_file(str(seeds["b"] / "model.safetensors"))
    marker = tmp_path / "pwned"
    state["model.norm.weight"] = _Exploit(marker)
    if legacy_format:
        with open(evil / "pytorch_model.bin", "wb") as f:
            pickle.dump(state, f)
    else:
        torch.save(state, evil / "pytorch_model.bin")
    spec = _ties(seeds)
    spec["models"][1]["model"] = str(evil)
    _fails(cli, tmp_path, write_spec(spec), expect="refused to load")
    assert not marker.exists()


def test_plain_bin_checkpoint_is_read(seeds, write_spec, cli, tmp_path):
    from safetensors.torch import load_file

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((seeds["b"] / "config.json").read_text())
    state = load_file(str(seeds["b"] / "model.safetensors"))
    torch.save(state, legacy / "pytorch_model.bin")
    spec = _ties(seeds)
    spec["models"][1]["model"] = str(legacy)
    code, _, stderr = cli("merge", write_spec(spec), tmp_path / "out", "--quiet")
    assert code == 0, stderr


def test_validate_reports_without_writing(seeds, write_spec, cli, tmp_path):
    code, stdout, _ = cli("validate", write_spec(_ties(seeds)))
    assert code == 0 and "valid ties spec over 3 models" in stdout
    spec = _ties(seeds)
    spec["models"][0]["parameters"]["density"] = "dense"
    code, _, stderr = cli("validate", write_spec(spec))
    assert code == 2 and "models[0].parameters.density: expected a number, got 'dense'" in stderr
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == json.dumps(["spec.yaml"])
