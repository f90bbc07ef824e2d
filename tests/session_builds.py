"""The session's slow builds, made by a low-priority child process while the tests run.

test_specialists' SMALL specialists (used by test_lm_eval, test_specialists and test_space), test_t2i_world's
REDUCED world (used by test_t2i_world and test_space_t2i) and test_t2i_compare's comparison (five methods, two
runs each, on tiny pipelines) take about a minute and a half of one core together. Their fixtures look for them
under the session's base temp. Started here as the session starts, at the lowest CPU priority (nice 19: it takes
only what the tests leave idle, the second core of a two-core machine), the child makes them in that order; a
fixture takes its part if the child has finished it, and otherwise stops the child and makes the part itself (the
builders' per-part caches keep what the child finished). The bytes are the same either way: the same functions,
parameters and kernels (the child inherits the environment; nothing is pinned).

`python tests/session_builds.py BASETEMP PART...` builds the parts (`specialists`, `world`, `compare`) in order.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# part -> the session fixtures that need it (any of them collected starts its build; test_space's `specialists`
# only waits: alone, it may use a full examples build instead)
PARTS = {"specialists": ("built", "small_build"), "world": ("world",), "compare": ("compared",)}
COMPARE_ROOT = (
    "t2i-compare"  # BASETEMP/t2i-compare/{build,out}: test_t2i_compare's demo build and bench output
)


def build(basetemp: Path, part: str) -> None:
    """Build one part where its session fixtures look for it."""
    if part == "specialists":
        from test_specialists import SMALL

        from hf_m2n2.demo.specialists import build_specialists

        build_specialists(basetemp / "specialists-small", SMALL)
    elif part == "world":
        from test_t2i_world import REDUCED, REDUCED_ROOT

        from hf_m2n2.demo.t2i_world import build_world

        build_world(basetemp / REDUCED_ROOT, REDUCED)
    elif part == "compare":
        from helpers import CLIP_JUDGE_SEED, TINY_PIPELINES
        from test_t2i_compare import build_layout, compare

        from hf_m2n2.demo.tiny_pipelines import build_tiny_judge, build_tiny_pipeline

        root = basetemp / COMPARE_ROOT / "sources"
        # conftest's clip_judge and pipelines sd1, sd1-a, sd1-b: the same builders and parameters
        sources = {"judge": build_tiny_judge(root / "judge", seed=CLIP_JUDGE_SEED)}
        for name in ("sd1", "sd1-a", "sd1-b"):
            family, kwargs = TINY_PIPELINES[name]
            sources[name] = build_tiny_pipeline(root / name, family, **kwargs)
        compare(build_layout(root.parent / "build", sources), root.parent / "out")
    else:
        raise ValueError(f"unknown part {part!r} (use {', '.join(PARTS)})")


def _done(basetemp: Path, part: str) -> Path:
    return basetemp / f"session-builds.{part}.done"


class SessionBuilds:
    """The child process building the parts the collected tests need (none: no child)."""

    def __init__(self, basetemp: Path, fixtures: set[str]):
        parts = [part for part, users in PARTS.items() if fixtures & set(users)]
        self.basetemp = basetemp
        self.process: subprocess.Popen | None = None
        if parts:
            root = Path(__file__).resolve().parents[1]
            path = os.pathsep.join([str(root), str(TESTS), os.environ.get("PYTHONPATH", "")])
            with open(basetemp / "session-builds.log", "wb") as log:
                self.process = subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), str(basetemp), *parts],
                    env={**os.environ, "PYTHONPATH": path},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )

    def take(self, part: str) -> bool:
        """Whether the child has made `part`; if it has not (yet), the child is stopped (killed: the builders' parts
        are written atomically) and the caller makes the part itself."""
        if not _done(self.basetemp, part).exists():
            self.stop()
        return _done(self.basetemp, part).exists()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


if __name__ == "__main__":
    os.nice(19)  # idle CPU only: the tests' own processes always go first
    sys.path.insert(0, str(TESTS))
    for name in sys.argv[2:]:
        build(Path(sys.argv[1]), name)
        _done(Path(sys.argv[1]), name).touch()
