"""What a new user meets first: custom code that must never run unasked, tokens that must never be printed, Hub
errors that say what to do, cards whose usage snippet loads, tokenizer files that are really there."""

from __future__ import annotations

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
