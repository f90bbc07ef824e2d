"""Killing, damaging and filling the disk under merge and evolve: kill -9 loses only the work in flight (the next
run removes what it left), two processes never share an output, damaged run files and a full disk give one line
naming the file and exit 2, and what was already safe stays intact."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import load_dir
from test_evolve_models import _spec as model_spec

from hf_m2n2.evolve.checkpoint import load_state, save_state

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# --- subprocesses: the CLI (optionally under a file size limit) and helpers killed at a chosen point -----------


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _limit_file_size(limit: int):
    def apply() -> None:
        # a write past the limit fails with EFBIG, as on a full disk (SIGXFSZ would kill the process instead)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _held_spec(tmp_path: Path, hold: Path) -> dict:
    """A dense spec whose evaluation waits while the file `hold` names the evaluating pid (`held_scores`)."""
    spec = dense_spec(tmp_path)
    spec["evaluate"] = {
        "kind": "python",
        "callable": "test_run_robustness:held_scores",
        "kwargs": {"hold": str(hold)},
    }
    return spec


def _held_evolve(args: list[str], run: Path, hold: Path) -> subprocess.Popen:
    """An evolve subprocess that holds `run`'s lock, stopped at its first evaluation until the test lets it go."""
    process = subprocess.Popen(
        [sys.executable, "-m", "hf_m2n2.cli", *args, "-q"], env=_env(), stderr=subprocess.PIPE, text=True
    )
    hold.write_text(str(process.pid))
    deadline = time.monotonic() + 120
    try:
        # held once it has locked `run` and written run.json (a loaded machine can be between the two)
        while not (
            (run / ".lock").is_file()
            and (run / ".lock").read_text().strip() == str(process.pid)
            and (run / "run.json").is_file()
        ):
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
    except BaseException:
        process.kill()
        raise
    return process


def hf(*args, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """`hf-m2n2 ARGS` in a child process; with `file_size_limit`, no file it writes can grow past that."""
    return subprocess.run(
        [sys.executable, "-m", "hf_m2n2.cli", *map(str, args)],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=None if file_size_limit is None else _limit_file_size(file_size_limit),
    )


# Each helper writes through hf-m2n2's own code path, says "ready" at the point where the test kills it.
HOLD_OUTPUT_DIR = """
import sys, time
from hf_m2n2.outdir import atomic_output_dir
with atomic_output_dir(sys.argv[1], overwrite=True) as tmp:
    (tmp / "model.safetensors").write_bytes(b"x" * 4096)
    print("ready", flush=True)
    time.sleep(600)
"""
KILL_IN_SWAP = """
import shutil, sys, time
import hf_m2n2.outdir
rmtree = shutil.rmtree
def stop_in_swap(path, *args, **kwargs):
    if ".old-" in str(path):  # the previous result is being deleted after the swap: the test kills us here
        print("ready", flush=True)
        time.sleep(600)
    rmtree(path, *args, **kwargs)
hf_m2n2.outdir.shutil.rmtree = stop_in_swap
with hf_m2n2.outdir.atomic_output_dir(sys.argv[1], overwrite=True) as tmp:
    (tmp / "model.safetensors").write_bytes(b"new")
"""
HOLD_FILE_WRITE = """
import sys, time
from hf_m2n2.outdir import atomic_write_bytes
def write(handle):
    handle.write(b"half a checkpoint")
    handle.flush()
    print("ready", flush=True)
    time.sleep(600)
atomic_write_bytes(sys.argv[1], write)
"""


def start_helper(script: str, *args) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = process.stdout.readline()
    assert line.strip() == "ready", process.stderr.read()
    return process


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --- specs ----------------------------------------------------------------------------------------------------


def merge_spec(seeds) -> dict:
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(seeds["a"]), "parameters": {"weight": 0.5}},
            {"model": str(seeds["b"]), "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    }


def dense_spec(state_dir: Path, down_at: int = 10**9, **evolve) -> dict:
    """40 passes of M2N2 on 32 parameters, scored by `outage:scores` (down once at call `down_at`)."""
    return {
        "name": "robust",
        "genome": {"kind": "dense", "size": 32, "seeds": {"kind": "random", "count": 2, "std": 0.1}},
        "evolve": {"algorithm": "m2n2", "budget": 40, "seed": 3, "log_every": 5, "archive_size": 6, **evolve},
        "evaluate": {
            "kind": "python",
            "callable": "outage:scores",
            "kwargs": {"state_dir": str(state_dir), "down_at": down_at},
        },
    }


def held_scores(params, hold: str) -> np.ndarray:
    """`outage:scores`' sign pattern; the process whose pid `hold` names waits until `hold` is removed."""
    while Path(hold).exists() and Path(hold).read_text() == str(os.getpid()):
        time.sleep(0.01)
    return (np.asarray(params[:16]) > 0).astype(np.float64)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted dense run, and the same run stopped by an outage at pass 22 with its checkpoint."""
    root = tmp_path_factory.mktemp("robust")
    from hf_m2n2.cli import main

    out = {}
    for name, down_at in (("calm", 10**9), ("stopped", 23)):
        (root / name).mkdir()
        spec = root / f"{name}.yaml"
        spec.write_text(yaml.safe_dump(dense_spec(root / name, down_at)))
        code = main(["evolve", str(spec), "--out", str(root / f"{name}-run"), "-q"])
        assert code == (0 if name == "calm" else 2)
        (root / name / "down").unlink(missing_ok=True)  # the service is back
        out[name] = root / f"{name}-run"
    return out


@pytest.fixture
def stopped(runs, tmp_path) -> Path:
    """A fresh copy of the interrupted run (resumable from pass 22)."""
    return Path(shutil.copytree(runs["stopped"], tmp_path / "run"))


def assert_same_as_calm(run: Path, calm: Path) -> None:
    assert (run / "history.jsonl").read_bytes() == (calm / "history.jsonl").read_bytes()
    assert (
        load_state(run / "archive.npz")["members"][0]["lineage"]
        == load_state(calm / "archive.npz")["members"][0]["lineage"]
    )


# --- 1. what a kill -9 leaves is removed by the next run into the same place --------------------------------


def test_a_killed_merge_s_temporary_is_removed_by_the_next_merge(seeds, tmp_path, write_spec, cli, caplog):
    out = tmp_path / "merged"
    helper = start_helper(HOLD_OUTPUT_DIR, out)
    kill(helper)
    [left] = leftovers(tmp_path, "merged")
    assert left.startswith(f".merged.tmp-{helper.pid}-")

    code, _, err = cli("merge", write_spec(merge_spec(seeds)), out, "-q")
    assert code == 0, err
    assert f"removed {left} left by a killed run (pid {helper.pid})" in caplog.text
    assert leftovers(tmp_path, "merged") == [] and (out / "model.safetensors").is_file()


def test_a_killed_overwrite_swap_is_removed_by_the_next_merge(seeds, tmp_path, write_spec, cli, caplog):
    out = tmp_path / "merged"
    spec = write_spec(merge_spec(seeds))
    assert cli("merge", spec, out, "-q")[0] == 0
    helper = start_helper(KILL_IN_SWAP, out)  # killed while deleting the previous result, after the swap
    kill(helper)
    [left] = leftovers(tmp_path, "merged")
    assert (out / "model.safetensors").read_bytes() == b"new"

    code, _, err = cli("merge", spec, out, "--overwrite", "-q")
    assert code == 0, err
    assert f"removed {left} left by a killed run (pid {helper.pid})" in caplog.text
    assert leftovers(tmp_path, "merged") == []


def test_a_live_merge_s_temporary_is_left_alone_and_a_second_merge_is_refused(
    seeds, tmp_path, write_spec, cli
):
    out = tmp_path / "merged"
    helper = start_helper(HOLD_OUTPUT_DIR, out)
    try:
        [live] = leftovers(tmp_path, "merged")
        code, _, err = cli("merge", write_spec(merge_spec(seeds)), out, "--overwrite", "-q")
        assert code == 2
        assert one_line(err) == f"error: {out}: another hf-m2n2 (pid {helper.pid}) is writing it"
        assert leftovers(tmp_path, "merged") == [live] and not out.exists()
    finally:
        kill(helper)


def test_writes_killed_in_a_run_directory_are_removed_on_resume(stopped, runs, cli, caplog):
    file_writer = start_helper(HOLD_FILE_WRITE, stopped / "checkpoint.npz")
    export = start_helper(HOLD_OUTPUT_DIR, stopped / "model")
    kill(file_writer)
    kill(export)
    left = leftovers(stopped, "checkpoint.npz") + leftovers(stopped, "model")
    assert len(left) == 2 and all(f"-{p.pid}-" in name for p, name in zip((file_writer, export), left))

    code, _, err = cli("evolve", "--resume", stopped, "-q")
    assert code == 0, err
    for process, name in zip((file_writer, export), left):
        assert f"removed {name} left by a killed run (pid {process.pid})" in caplog.text
    assert leftovers(stopped, "checkpoint.npz") + leftovers(stopped, "model") == []
    assert_same_as_calm(stopped, runs["calm"])


# --- 2. one process per output: a second evolve into a live run is refused ------------------------------------


def test_a_second_evolve_into_a_live_run_is_refused(tmp_path, write_spec, cli):
    hold = tmp_path / "hold"
    spec_path = write_spec(_held_spec(tmp_path, hold))
    run = tmp_path / "run"
    process = _held_evolve(["evolve", str(spec_path), "--out", str(run)], run, hold)
    try:
        refusal = f"error: {run}: another evolve (pid {process.pid}) is running in it"
        code, _, err = cli("evolve", "--resume", run, "-q")
        assert (code, one_line(err)) == (2, refusal)
        code, _, err = cli("evolve", spec_path, "--out", run, "--overwrite", "-q")
        assert (code, one_line(err)) == (2, refusal)
        assert (run / "run.json").is_file()  # the live run's directory is untouched
    finally:
        hold.unlink()
        assert process.wait(timeout=120) == 0, process.stderr.read()
    passes = [json.loads(line)["passes"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert passes == list(range(5, 41, 5))


# --- 3. damaged run files: one line naming the file, exit 2 -------------------------------------------------


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10  # inside the first stored array: its CRC no longer matches
    path.write_bytes(bytes(data))


def _change_history(path: Path) -> None:
    text = path.read_text()
    changed = text.replace('"passes": 10', '"passes": 19', 1)
    assert changed != text and len(changed) == len(text)
    path.write_text(changed)


def _other_default(path: Path) -> None:
    """The checkpoint as an hf-m2n2 with another archive_size default would have written it."""
    state = load_state(path)
    state["strategy"]["config"]["archive_size"] = 5
    save_state(path, state)


DAMAGE = {
    "checkpoint truncated": (
        "checkpoint.npz",
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    ),
    "checkpoint emptied": ("checkpoint.npz", lambda p: p.write_bytes(b"")),
    "checkpoint bit-flipped": ("checkpoint.npz", _flip),
    "checkpoint random bytes": (
        "checkpoint.npz",
        lambda p: p.write_bytes(np.random.default_rng(0).bytes(p.stat().st_size)),
    ),
    "checkpoint pickle": ("checkpoint.npz", lambda p: p.write_bytes(b"\x80\x04K\x01.")),
    "history bytes changed": ("history.jsonl", _change_history),
    "run.json garbled": ("run.json", lambda p: p.write_bytes(b'{"seed": 3, "ru')),
    "settings changed": ("checkpoint.npz", _other_default),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_run_file_is_one_line_naming_it(stopped, cli, damage):
    name, damage_it = DAMAGE[damage]
    damage_it(stopped / name)
    before = {p.name: p.read_bytes() for p in stopped.iterdir() if p.is_file()}
    code, _, err = cli("evolve", "--resume", stopped, "-q")
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"error: {stopped / name}") and "allow_pickle" not in line
    if damage == "settings changed":
        assert "archive_size: 5 then, 6 now" in line
    assert {p.name: p.read_bytes() for p in stopped.iterdir() if p.is_file()} == before  # nothing touched


def test_a_deleted_checkpoint_restarts_the_run_saying_so(stopped, runs, cli, caplog):
    (stopped / "checkpoint.npz").unlink()
    code, _, err = cli("evolve", "--resume", stopped, "-q")
    assert code == 0, err
    assert f"{stopped / 'checkpoint.npz'} is missing: the run starts over" in caplog.text
    assert_same_as_calm(stopped, runs["calm"])


# --- 4. the finished marker is written last ------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_run(seeds, tmp_path_factory) -> Path:
    from hf_m2n2.evolve.runs import start_runs

    root = tmp_path_factory.mktemp("robust_models")
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(model_spec(seeds)))
    start_runs(spec_path, root / "run", progress=False)
    return root / "run"


def test_a_run_killed_before_its_report_exports_again_on_resume(model_run, tmp_path, cli, caplog):
    run = Path(shutil.copytree(model_run, tmp_path / "run"))
    (run / "report.json").unlink()  # as left by a kill between the rename of model/ and the report
    gram = run / "gram.npz"
    gram.write_bytes(gram.read_bytes()[:100])  # and a cache truncated by a full disk
    code, _, err = cli("evolve", "--resume", run, "-q")
    assert code == 0, err
    assert f"{gram} is damaged; recomputing it" in caplog.text
    assert json.loads((run / "report.json").read_text()) == json.loads(
        (model_run / "report.json").read_text()
    )
    assert load_dir(run / "model").keys() == load_dir(model_run / "model").keys()
    assert (run / "model" / "model.safetensors").read_bytes() == (
        model_run / "model" / "model.safetensors"
    ).read_bytes()


# --- 5. a full disk: one line, exit 2, what was safe stays safe ---------------------------------------------


def test_a_full_disk_at_an_evolve_checkpoint_keeps_the_last_one(runs, tmp_path, write_spec, cli):
    (tmp_path / "state").mkdir()
    spec = write_spec(dense_spec(tmp_path / "state", checkpoint_every_steps=1))
    run = tmp_path / "run"
    result = hf("evolve", spec, "--out", run, "-q", file_size_limit=4000)  # the first checkpoint is ~3.3 kB
    assert result.returncode == 2, result.stderr
    assert one_line(result.stderr) == (
        f"error: {run}: cannot write: File too large; the last checkpoint is intact; "
        f"free space and continue with: hf-m2n2 evolve --resume {run}"
    )
    assert load_state(run / "checkpoint.npz")["loop"]["passes"] >= 1
    code, _, err = cli("evolve", "--resume", run, "-q")  # the disk has room again: in-process is enough
    assert code == 0, err
    assert_same_as_calm(run, runs["calm"])


def test_a_full_disk_before_the_first_checkpoint_leaves_nothing(tmp_path, write_spec):
    spec = write_spec(dense_spec(tmp_path))
    result = hf(
        "evolve", spec, "--out", tmp_path / "run", "-q", file_size_limit=100
    )  # spec.yaml's copy fails
    assert result.returncode == 2
    assert one_line(result.stderr).startswith(f"error: {tmp_path / 'run'}: cannot write: File too large")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["weights", "tokenizer"])
def test_a_full_disk_under_merge_keeps_the_previous_output(seeds, tmp_path, write_spec, cli, where):
    spec = merge_spec(seeds)
    if where == "tokenizer":  # a tokenizer larger than the weights: the copy, not the weights, hits the limit
        base = Path(shutil.copytree(seeds["a"], tmp_path / "big-tokenizer"))
        tokenizer = base / "tokenizer.json"
        tokenizer.write_text(tokenizer.read_text() + " " * 2_000_000)
        spec["models"][0]["model"] = str(base)
    spec_path = write_spec(spec)
    out = tmp_path / "merged"
    assert cli("merge", spec_path, out, "-q")[0] == 0  # the previous output (no limit: in-process)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    limit = 100_000 if where == "weights" else 1_000_000
    result = hf("merge", spec_path, out, "--overwrite", "-q", file_size_limit=limit)
    assert result.returncode == 2, result.stderr
    assert "File too large" in one_line(result.stderr) and str(out) in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path, "merged") == []


# --- 6. the gaps between two steps: a kill between renames, a sweep racing a new temporary, a live run's runs ---

KILL_BETWEEN_RENAMES = """
import os, sys, time
from pathlib import Path
import hf_m2n2.outdir
target = Path(sys.argv[1])
rename = os.rename
def stop_before_the_last(src, dst, *args, **kwargs):
    if Path(dst) == target and not os.path.lexists(target):  # the previous result is moved away: killed here
        print("ready", flush=True)
        time.sleep(600)
    rename(src, dst, *args, **kwargs)
hf_m2n2.outdir.os.rename = stop_before_the_last
with hf_m2n2.outdir.atomic_output_dir(target, overwrite=True) as tmp:
    (tmp / "model.safetensors").write_bytes(b"new")
"""


def test_a_kill_between_the_renames_of_an_overwrite_keeps_a_result(seeds, tmp_path, write_spec, cli, caplog):
    out = tmp_path / "merged"
    spec = write_spec(merge_spec(seeds))
    assert cli("merge", spec, out, "-q")[0] == 0
    helper = start_helper(KILL_BETWEEN_RENAMES, out)
    kill(helper)
    assert not out.exists()  # killed with the previous result moved away and the new one not yet in place

    code, _, err = cli("merge", spec, out, "-q")  # no --overwrite: the finished new result is put back first
    assert (code, one_line(err)) == (2, f"error: {out} already exists (use --overwrite to replace it)")
    assert f"{out}: restored its finished new result (a run killed while replacing it" in caplog.text
    assert (out / "model.safetensors").read_bytes() == b"new"
    assert leftovers(tmp_path, "merged") == []


def test_a_swap_directory_holding_the_only_copy_of_the_previous_result_restores_it(
    seeds, tmp_path, write_spec, cli, caplog
):
    out = tmp_path / "merged[1]"  # a name with glob characters
    spec = write_spec(merge_spec(seeds))
    assert cli("merge", spec, out, "-q")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    swap = (
        tmp_path / ".merged[1].old-999999-abcd"
    )  # as a killed replace whose new result was unfinished leaves
    swap.mkdir()
    out.rename(swap / "previous")
    unfinished = tmp_path / ".merged[1].tmp-999999-efgh"
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"half")

    code, _, err = cli("merge", spec, out, "--overwrite", "-q")
    assert code == 0, err
    assert f"{out}: restored the previous result (a run killed while replacing it" in caplog.text
    assert leftovers(tmp_path, "merged[1]") == []
    assert {p.name: p.read_bytes() for p in out.iterdir()}.keys() == before.keys()


def test_a_merge_is_refused_while_another_swaps_its_result_in(seeds, tmp_path, write_spec, cli):
    out = tmp_path / "merged"
    spec = write_spec(merge_spec(seeds))
    assert cli("merge", spec, out, "-q")[0] == 0
    helper = start_helper(KILL_IN_SWAP, out)  # alive, deleting the previous result after its renames
    try:
        code, _, err = cli("merge", spec, out, "--overwrite", "-q")
        assert (code, one_line(err)) == (2, f"error: {out}: another hf-m2n2 (pid {helper.pid}) is writing it")
        assert (out / "model.safetensors").read_bytes() == b"new"
    finally:
        kill(helper)


def _finished_runs(tmp_path: Path, write_spec, cli) -> tuple[Path, Path, Path]:
    """A directory of one finished run whose evaluation waits while the file `hold` names the evaluating pid."""
    hold = tmp_path / "hold"
    spec_path = write_spec(_held_spec(tmp_path, hold))
    out = tmp_path / "runs"
    code, _, err = cli("evolve", spec_path, "--out", out, "--runs", "1", "-q")
    assert code == 0, err
    return spec_path, out, hold


def test_overwrite_refuses_a_directory_whose_run_resumes_alone(tmp_path, write_spec, cli):
    spec_path, out, hold = _finished_runs(tmp_path, write_spec, cli)
    run = out / "run-0"
    for name in ("summary.json", "checkpoint.npz"):
        (run / name).unlink()  # the run starts over on resume
    process = _held_evolve(["evolve", "--resume", str(run)], run, hold)
    try:
        code, _, err = cli("evolve", spec_path, "--out", out, "--overwrite", "-q")
        assert (code, one_line(err)) == (
            2,
            f"error: {run}: another evolve (pid {process.pid}) is running in it",
        )
        assert (out / "runs.json").is_file() and (run / "run.json").is_file()  # nothing deleted
    finally:
        hold.unlink()
        assert process.wait(timeout=120) == 0, process.stderr.read()
    assert (run / "summary.json").is_file()


def test_a_directory_filled_while_an_evolve_starts_is_refused_and_left_alone(
    tmp_path, write_spec, cli, monkeypatch
):
    import hf_m2n2.evolve.runs as runs_module

    out = tmp_path / "run"
    out.mkdir()
    check_offline = runs_module.check_offline

    def another_writer_meanwhile(*args):  # between the emptiness check and the lock, someone writes into it
        check_offline(*args)
        (out / "notes.txt").write_text("someone else's\n")

    monkeypatch.setattr(runs_module, "check_offline", another_writer_meanwhile)
    code, _, err = cli("evolve", write_spec(dense_spec(tmp_path)), "--out", out, "-q")
    assert code == 2 and "not empty" in one_line(err)
    assert (out / "notes.txt").read_text() == "someone else's\n"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_an_atomic_file_write_whose_temporary_a_sweep_removed_is_one_error(tmp_path, monkeypatch):
    import tempfile

    from hf_m2n2.errors import OutputError
    from hf_m2n2.outdir import atomic_write_bytes

    mkstemp = tempfile.mkstemp

    def swept_at_once(*args, **kwargs):  # another run's sweep removes it before this one could lock it
        fd, name = mkstemp(*args, **kwargs)
        os.unlink(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", swept_at_once)
    before = _open_fds()
    with pytest.raises(
        OutputError, match=r"^cannot create .*\.data\.bin\.tmp-.*: removed while being created$"
    ):
        atomic_write_bytes(tmp_path / "data.bin", lambda handle: handle.write(b"x"))
    assert _open_fds() == before and sorted(tmp_path.iterdir()) == []


def test_an_atomic_file_write_that_cannot_lock_leaves_no_temporary_and_no_descriptor(tmp_path, monkeypatch):
    import errno
    import fcntl

    from hf_m2n2.errors import OutputError
    from hf_m2n2.outdir import atomic_write_bytes

    def no_locks(fd, operation):  # a filesystem without flock support (some NFS mounts)
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    before = _open_fds()
    with pytest.raises(OutputError, match=r"^cannot create .*\.data\.bin\.tmp-.*: No locks available$"):
        atomic_write_bytes(tmp_path / "data.bin", lambda handle: handle.write(b"x"))
    assert _open_fds() == before and sorted(tmp_path.iterdir()) == []


def test_atomic_writes_never_loosen_the_process_umask(tmp_path, monkeypatch):
    from hf_m2n2.outdir import atomic_output_dir, atomic_write_text

    umask = os.umask(0o022)
    os.umask(umask)
    real_umask = os.umask
    probes = []

    def umask_then_another_thread_creates_a_file(mask):
        previous = real_umask(mask)
        probe = tmp_path / f"probe-{len(probes)}"  # what a file another thread creates right now gets
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o666))
        probes.append(probe.stat().st_mode & 0o777)
        return previous

    monkeypatch.setattr(os, "umask", umask_then_another_thread_creates_a_file)
    atomic_write_text(tmp_path / "a.txt", "a")
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "b.txt").write_text("b")
    assert all(mode == 0o666 & ~umask for mode in probes), [oct(m) for m in probes]
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_an_io_error_reading_a_seed_names_the_seed_not_the_output(
    seeds, tmp_path, write_spec, cli, monkeypatch
):
    import errno
    import shutil as shutil_module

    base = Path(shutil.copytree(seeds["a"], tmp_path / "seed"))
    spec = merge_spec(seeds)
    spec["models"][0]["model"] = str(base)
    out = tmp_path / "merged"
    copyfile = shutil_module.copyfile

    def failing_disk_under_the_seed(src, dst, *args, **kwargs):
        if Path(src) == base / "tokenizer.json":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        return copyfile(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil_module, "copyfile", failing_disk_under_the_seed)
    code, _, err = cli("merge", write_spec(spec), out, "-q")
    assert code == 2
    assert one_line(err) == f"error: {base / 'tokenizer.json'}: cannot read: Input/output error"
    assert not out.exists() and leftovers(tmp_path, "merged") == []


def test_io_errors_under_the_output_or_its_temporaries_name_the_output(tmp_path):
    import errno

    from hf_m2n2.cli import _storage_error

    out = tmp_path / "merged"
    for name in (out / "model.safetensors", tmp_path / ".merged.tmp-12-ab" / "model.safetensors", None):
        error = _storage_error(OSError(errno.EIO, "Input/output error", name), str(out))
        assert str(error) == f"{out}: cannot write: Input/output error"
    seed = (
        tmp_path / "seed" / "model.safetensors"
    )  # a disk that refuses a write is the output's, whatever it names
    assert str(_storage_error(OSError(errno.ENOSPC, "No space left on device", seed), str(out))) == (
        f"{out}: cannot write: No space left on device"
    )


def test_a_killed_push_s_upload_view_of_an_output_with_glob_characters_is_swept(
    seeds, tmp_path, write_spec, cli
):
    from hf_m2n2.push import _hub_view

    out = tmp_path / "merged[1]"
    assert cli("merge", write_spec(merge_spec(seeds)), out, "-q")[0] == 0
    killed = tmp_path / ".merged[1].push-999999-abcd"  # the upload view of a push that was killed
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"")
    with _hub_view(out, "alice/merged") as view:
        assert view.parent == tmp_path and (view / "model.safetensors").is_file()
        assert not killed.exists()
    assert leftovers(tmp_path, "merged[1]") == []
