"""Old path of `hf_m2n2.demo.specialists`, kept for `python -m hf_m2n2.specialists ROOT` and existing imports."""

import sys

from hf_m2n2.demo.specialists import (
    BUILD_VERSION,
    MARKER,
    SKILL_DESCRIPTIONS,
    SKILL_EXAMPLES,
    SKILLS,
    TASK_PREFIX,
    Specialists,
    SpecialistsConfig,
    build_specialists,
    heldout_examples,
    main,
    specialists_report,
    task_name,
    train_on_answers,
)

__all__ = [
    "BUILD_VERSION",
    "MARKER",
    "SKILL_DESCRIPTIONS",
    "SKILL_EXAMPLES",
    "SKILLS",
    "TASK_PREFIX",
    "Specialists",
    "SpecialistsConfig",
    "build_specialists",
    "heldout_examples",
    "main",
    "specialists_report",
    "task_name",
    "train_on_answers",
]

if __name__ == "__main__":
    sys.exit(main())
