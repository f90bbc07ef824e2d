"""A fitness function behind a "service" that goes down once: the outage tests' evaluator (`outage:scores`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hf_m2n2.errors import InfrastructureError


def scores(params, state_dir: str, down_at: int) -> np.ndarray:
    """Per-example scores = sign pattern of the first 16 parameters. Call `down_at` finds the service down (it
    stays down while `state_dir/down` exists); calls are counted in `state_dir/calls`."""
    state = Path(state_dir)
    calls = int((state / "calls").read_text()) + 1 if (state / "calls").exists() else 1
    (state / "calls").write_text(str(calls))
    if calls == down_at and not (state / "was_down").exists():
        (state / "down").write_text("")
        (state / "was_down").write_text("")
    if (state / "down").exists():
        raise InfrastructureError("http://127.0.0.1:9/score", "connection refused")
    return (np.asarray(params[:16]) > 0).astype(np.float64)
