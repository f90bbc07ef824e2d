"""`hf-m2n2 export RUN OUT --front K`: member K of a finished nsga2 run's Pareto front (`pareto.json`), exported as
the run exported its best member: weights, recipe, and a lineage card with its held-out scores and the seeds'
(measured now, with the run's evaluator)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hf_m2n2.errors import HfM2n2Error
from hf_m2n2.evolve.pareto import PARETO


def export_front(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    index: int,
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Export front member K of the finished nsga2 run `run_dir` into `out_dir`.

    Raises:
        HfM2n2Error: the run is not a finished nsga2 run, K is not on its front, or `out_dir` exists.
    """
    from hf_m2n2.evolve.build import build_run
    from hf_m2n2.evolve.loop import SUMMARY, load_archive
    from hf_m2n2.evolve.outcome import RunOutcome
    from hf_m2n2.evolve.runs import SPEC_COPY, RunInfo, closing_executor, with_trust
    from hf_m2n2.evolve.spec import load_evolve_spec
    from hf_m2n2.evolve.strategy import Lineage, Member
    from hf_m2n2.outdir import check_output_dir

    run = Path(run_dir)
    if not (run / PARETO).is_file():
        raise HfM2n2Error(
            f"{run} has no {PARETO}: --front exports a member of a finished nsga2 run's Pareto front"
        )
    front = json.loads((run / PARETO).read_text())["front"]
    if not 0 <= index < len(front):
        raise HfM2n2Error(f"--front {index}: the front of {run} has members 0..{len(front) - 1}")
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    info = RunInfo.load(run)
    spec = with_trust(load_evolve_spec(run / SPEC_COPY)[0], trust_remote_code)
    summary = json.loads((run / SUMMARY).read_text())
    parts = build_run(spec, info.seed, run, Path(info.spec_dir) if info.spec_dir else None)
    with closing_executor(parts.executor):
        stored = load_archive(run)["members"][index]
        lineage = Lineage.from_dict(stored["lineage"])
        if lineage.id != front[index]["id"]:
            raise HfM2n2Error(f"{run}: the archive and {PARETO} disagree on front member {index}")
        member = Member(
            parts.ops.from_state(stored["genome"]), stored["scores"], lineage, stored.get("extra", {})
        )
        name = f"{spec.name or 'nsga2-merge'}-front{index}"
        outcome = RunOutcome.of(spec, parts, run, summary, best=member, merged_name=name)
        spec.kind.export(parts.genome, spec, outcome, out)
    return out
