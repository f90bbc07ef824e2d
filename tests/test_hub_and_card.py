"""Model references resolved through the real huggingface_hub cache code path, and the lineage card."""

from __future__ import annotations

import torch
import yaml
from helpers import load_dir
from huggingface_hub import ModelCard

from hf_m2n2.hub import resolve_model, split_reference


def test_split_reference():
    assert split_reference("org/name@v1.0") == ("org/name", "v1.0")
    assert split_reference("org/name") == ("org/name", None)


def test_resolves_branch_and_pinned_sha_from_offline_cache(cached_repo):
    main = resolve_model(cached_repo["repo_id"])
    assert main.commit == cached_repo["main"] and main.path.name == cached_repo["main"]
    old = resolve_model(f"{cached_repo['repo_id']}@{cached_repo['old']}")
    assert old.commit == cached_repo["old"] and old.pinned == f"{cached_repo['repo_id']}@{cached_repo['old']}"


def test_merge_of_hub_refs_pins_revisions_in_card(seeds, cached_repo, write_spec, cli, tmp_path):
    repo = cached_repo["repo_id"]
    spec = write_spec(
        {
            "merge_method": "ties",
            "base_model": str(seeds["base"]),
            "models": [
                {"model": repo, "parameters": {"weight": 0.5, "density": 0.7}},
                {"model": f"{repo}@{cached_repo['old']}", "parameters": {"weight": 0.5, "density": 0.7}},
            ],
        }
    )
    out = tmp_path / "merged"
    code, _, stderr = cli("merge", spec, out, "--quiet")
    assert code == 0, stderr
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["base", repo]  # local seeds by directory name (pushed cards drop them)
    assert card.data.base_model_relation == "merge"
    assert card.data.library_name == "transformers"
    assert {"merge", "hf-m2n2", "ties"} <= set(card.data.tags)
    assert card.data.license == "apache-2.0"
    assert cached_repo["main"] in card.text and cached_repo["old"] in card.text
    assert "arxiv.org" in card.text  # the method's paper
    assert f'model_id = "{out}"' in card.text  # the usage snippet loads the output directory as given
    assert yaml.safe_load(card.text.split("```yaml")[1].split("```")[0])["merge_method"] == "ties"
    # main is ft-a's weights and the old commit ft-b's: the merge must equal the local-directory merge
    local = write_spec(
        {
            "merge_method": "ties",
            "base_model": str(seeds["base"]),
            "models": [
                {"model": str(seeds["a"]), "parameters": {"weight": 0.5, "density": 0.7}},
                {"model": str(seeds["b"]), "parameters": {"weight": 0.5, "density": 0.7}},
            ],
        },
        "local.yaml",
    )
    assert cli("merge", local, tmp_path / "local", "--quiet")[0] == 0
    hub_out, local_out = load_dir(out), load_dir(tmp_path / "local")
    assert all(torch.equal(hub_out[n], local_out[n]) for n in local_out)


def test_card_license_other_when_seeds_disagree(seeds, write_spec, cli, tmp_path):
    spec = write_spec(
        {
            "merge_method": "linear",
            "base_model": str(seeds["base"]),
            "tokenizer_source": "base",
            "models": [
                {"model": str(seeds["base"]), "parameters": {"weight": 1}},
                {"model": str(seeds["wide"]), "parameters": {"weight": 1}},
            ],
        }
    )
    assert cli("merge", spec, tmp_path / "out", "--quiet")[0] == 0
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.license == "other"
    assert "licenses differ" in card.text and "mit" in card.text
    assert card.data.base_model == ["base", "ft-wide"]
