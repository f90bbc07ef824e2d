"""`evaluate:` as a list of parts: one fitness vector made of several evaluators' score vectors, end to end.

The paper's agent experiment scores a merge on GSM8K (lm-eval) and on WebShop sessions at once: each part
scores the same candidate, and the fitness vector is their concatenation, part by part in spec order, each
part's examples repeated `weight` times. Each part keeps its own held-out figures in the report.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hf_m2n2.evaluate.base import Report


class PartsEvaluator:
    """Several evaluators of one candidate, concatenated.

    Args:
        parts: the evaluators, in spec order.
        weights: one repeat count per part (>= 1).

    Example:
        >>> both = PartsEvaluator([math, agent], [1, 2])  # doctest: +SKIP
        >>> both.scores(model).shape  # doctest: +SKIP
        (n_math + 2 * n_agent,)
    """

    def __init__(self, parts: list[Any], weights: list[int], names: list[str] | None = None):
        if len(parts) != len(weights) or not parts:
            raise ValueError("one weight per part, and at least one part")
        self.parts = list(parts)
        self.weights = [int(w) for w in weights]
        self.names = list(names) if names is not None else [f"part{i}" for i in range(len(parts))]
        self._sizes: list[int] = []  # each part's number of examples, from the last `scores`

    def scores(self, model: Any) -> np.ndarray:
        vectors = [np.asarray(part.scores(model), dtype=np.float64) for part in self.parts]
        self._sizes = [v.shape[0] for v in vectors]
        return np.concatenate([np.tile(v, w) for v, w in zip(vectors, self.weights)])

    def candidate_scored(self, candidate_id: int, scores: np.ndarray) -> None:
        """The executor's hook after `scores`: passed on to each part that has it, with that part's own scores."""
        offset = 0
        for part, weight, size in zip(self.parts, self.weights, self._sizes):
            hook = getattr(part, "candidate_scored", None)
            if hook is not None:
                hook(candidate_id, scores[offset : offset + size])
            offset += size * weight

    def part_means(self, scores: np.ndarray) -> dict[str, float] | None:
        """`{part name: mean score}` of a fitness vector this evaluator computed (each part's examples once, its
        weight not counted); None before the first `scores` call."""
        if not self._sizes:
            return None
        means, offset = {}, 0
        for name, weight, size in zip(self.names, self.weights, self._sizes):
            means[name] = float(np.mean(scores[offset : offset + size]))
            offset += size * weight
        return means

    def describe(self) -> dict[str, Any] | None:
        """How the parts score, for the card: one part's own description, or the parts' summaries and settings side
        by side (each setting named `part.setting`); None when no part describes itself."""
        described = [
            (name, part.describe()) for name, part in zip(self.names, self.parts) if hasattr(part, "describe")
        ]
        described = [(name, d) for name, d in described if d]
        if not described:
            return None
        if len(described) == 1:
            name, only = described[0]
            return {**only, "summary": f"Part `{name}`: {only.get('summary', '')}".strip()}
        return {
            "summary": " ".join(f"Part `{name}`: {d.get('summary', '')}".strip() for name, d in described),
            "generation": {
                f"{name}.{key}": value
                for name, d in described
                for key, value in (d.get("generation") or {}).items()
            },
        }

    def test_score(self, model: Any) -> float | None:
        """The unweighted mean of the parts' held-out scores (None when no part has one)."""
        values = [v for v in (part.test_score(model) for part in self.parts) if v is not None]
        return float(np.mean(values)) if values else None

    def example_groups(self) -> np.ndarray | None:
        """Each part's group ids, shifted past the previous parts' (None unless every part has groups)."""
        groups, offset = [], 0
        for part, weight in zip(self.parts, self.weights):
            ids = part.example_groups()
            if ids is None:
                return None
            ids = np.asarray(ids, dtype=np.int64)
            groups.append(np.tile(ids + offset, weight))
            offset += int(ids.max()) + 1 if ids.size else 0
        return np.concatenate(groups)

    def report(self, model: Any) -> Report:
        """Every part's figures; a name two parts share is prefixed with its part's index (`part1.test`)."""
        reports = [part.report(model) for part in self.parts]
        seen: dict[str, int] = {}
        for report in reports:
            for name in report.scores:
                seen[name] = seen.get(name, 0) + 1
        scores: dict[str, float] = {}
        metrics: dict[str, str] = {}
        for i, report in enumerate(reports):
            for name, value in report.scores.items():
                key = f"part{i}.{name}" if seen[name] > 1 else name
                scores[key], metrics[key] = value, report.metric_of(name)
        common = set(metrics.values())
        return Report(scores, common.pop() if len(common) == 1 else "score", metrics=metrics)
