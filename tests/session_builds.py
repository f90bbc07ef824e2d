"""The session's slow builds, made in a child process while the tests run.

test_specialists' SMALL specialists (used by test_lm_eval, test_specialists and test_space), test_t2i_world's
REDUCED world (used by test_t2i_world and test_space_t2i) and test_t2i_compare's comparison (five methods, two
runs each, on tiny pipelines) take about a minute and a half of one core together. Their fixtures look for them
under the session's base temp; started here as the session starts, the builds run on the second core while the
first runs the other tests, and the fixtures find them made. The bytes are the same: the same functions,
parameters and kernels (the child inherits the environment; nothing is pinned).

`python tests/session_builds.py BASETEMP PART...` builds the parts (`specialists`, `world`, `compare`) in order.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
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
        from test_t2i_compare import build_layout, compare

        from hf_m2n2.demo.tiny_pipelines import build_tiny_judge, build_tiny_pipeline

        root = basetemp / COMPARE_ROOT
        # conftest's clip_judge and pipelines sd1, sd1-a, sd1-b: the same builders and seeds
        sources = {
            "judge": build_tiny_judge(root / "sources" / "judge", seed=0),
            "sd1": build_tiny_pipeline(root / "sources" / "sd1", "sd1", seed=0),
            "sd1-a": build_tiny_pipeline(
                root / "sources" / "sd1-a", "sd1", seed=1, base_seed=0, variants=("fp16",)
            ),
            "sd1-b": build_tiny_pipeline(root / "sources" / "sd1-b", "sd1", seed=2, base_seed=0),
        }
        compare(build_layout(root / "build", sources), root / "out")
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

    def wait(self, part: str) -> bool:
        """Block until the child has built `part` or ended; returns whether `part` was built (a failed child leaves
        the fixture to build, and report its error, in-process)."""
        while (
            self.process is not None
            and self.process.poll() is None
            and not _done(self.basetemp, part).exists()
        ):
            time.sleep(0.1)
        return _done(self.basetemp, part).exists()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


if __name__ == "__main__":
    sys.path.insert(0, str(TESTS))
    for name in sys.argv[2:]:
        build(Path(sys.argv[1]), name)
        _done(Path(sys.argv[1]), name).touch()
