"""The CLIP fitness (`evaluate: {kind: clip}`): torchmetrics' CLIP score, per-prompt examples, fixed image seeds,
embeddings computed once, failing candidates scored 0, bad input refused, runs on pipelines resumable bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import sigkill_evolve

from hf_m2n2.errors import EvaluationError, SpecError
from hf_m2n2.evaluate.clip import (
    ClipConfig,
    ClipEvaluator,
    clip_scores,
    image_seed,
    load_judge,
    load_prompts,
    text_features_of,
)

ROWS = [
    {"id": "en-0", "prompt": "a red circle", "group": "en"},
    {"id": "en-1", "prompt": "a blue square on the left", "group": "en"},
    {"id": "ja-0", "prompt": "赤い丸", "scoring_text": "a red circle", "group": "ja"},
]
TEST_ROWS = [
    {"id": "en-9", "prompt": "a green triangle", "group": "en"},
    {"id": "ja-9", "prompt": "緑の三角", "scoring_text": "a green triangle", "group": "ja"},
]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompts")
    return {"fit": _jsonl(root / "fit.jsonl", ROWS), "test": _jsonl(root / "test.jsonl", TEST_ROWS)}


def _config(clip_judge: Path, prompts: dict[str, Path], **overrides) -> ClipConfig:
    values = dict(
        kind="clip",
        model=str(clip_judge),
        prompts=str(prompts["fit"]),
        test_prompts=str(prompts["test"]),
        images_per_prompt=2,
        num_inference_steps=2,
        batch_size=4,
        seed=3,
    )
    return ClipConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def live(pipelines):
    from hf_m2n2.live_pipeline import LivePipeline
    from hf_m2n2.seeds import open_seeds

    [seed] = open_seeds([str(pipelines["sd1-a"])])
    return LivePipeline(seed)


@pytest.fixture(scope="module")
def evaluator(live, clip_judge, prompts) -> ClipEvaluator:
    return ClipEvaluator(_config(clip_judge, prompts), live.model)


def test_clip_score_is_torchmetrics_clip_score(clip_judge):
    """The same uint8 images and texts give torchmetrics' CLIPScore (max(100 cos, 0)), per image."""
    from torchmetrics.functional.multimodal import clip_score

    config = ClipConfig(kind="clip", model=str(clip_judge), prompts="unused.txt")
    judge, processor = load_judge(config, None, "cpu", "evaluate")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 32, 32), generator=generator, dtype=torch.uint8)
    texts = ["a red circle", "a blue square", "two shapes", "left", "緑の三角"]
    ours = clip_scores(
        judge,
        processor,
        [img.permute(1, 2, 0).numpy() for img in images],
        text_features_of(judge, processor, texts),
    )

    class Tensors(torch.nn.Module):
        """torchmetrics 1.9 expects feature tensors; transformers 5 returns them as outputs' `pooler_output`."""

        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            return self.model.get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return self.model.get_text_features(*args, **kwargs).pooler_output

    for i in range(len(texts)):  # one pair per call: torchmetrics returns the mean over its batch
        theirs = clip_score(
            images[i : i + 1], texts[i], model_name_or_path=lambda: (Tensors(judge), processor)
        )
        assert ours[i] == pytest.approx(float(theirs.detach()), abs=1e-4)
    assert (ours >= 0).all() and (ours <= 100).all()


def test_prompts_files(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("a red circle\n\n  a blue square\n")
    rows = load_prompts(text, "evaluate.prompts")
    assert [(r.id, r.prompt, r.scoring_text) for r in rows] == [
        ("0", "a red circle", "a red circle"),
        ("2", "  a blue square", "  a blue square"),
    ]
    split = _jsonl(
        tmp_path / "split.jsonl", [{**r, "split": "train" if i else "test"} for i, r in enumerate(ROWS)]
    )
    assert [r.id for r in load_prompts(split, "evaluate.prompts", "train")] == ["en-1", "ja-0"]
    bad = {
        "empty.txt": ("\n \n", "has no prompts"),
        "notjson.jsonl": ("{oops\n", "not JSON"),
        "key.jsonl": ('{"prompt": "x", "caption": "y"}\n', "unknown key 'caption'"),
        "noprompt.jsonl": ('{"id": "a"}\n', "'prompt' must be a non-empty string"),
        "dup.jsonl": ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "id 'a' is used twice"),
    }
    for name, (content, message) in bad.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(SpecError, match=message) as info:
            load_prompts(tmp_path / name, "evaluate.prompts")
        assert str(info.value).startswith("evaluate.prompts:") and "\n" not in str(info.value)
    with pytest.raises(SpecError, match="no prompts of split 'dev'"):
        load_prompts(split, "evaluate.prompts", "dev")


def test_scores_are_per_prompt_means_and_reproducible(evaluator, live):
    scores = evaluator.scores(live.model)
    assert scores.shape == (3,) and (scores >= 0).all()
    per_image = clip_scores(
        evaluator.judge,
        evaluator.processor,
        [image for _, images in evaluator.last_images for image in images],
        evaluator._text["fit"].repeat_interleave(2, dim=0),
    )
    np.testing.assert_allclose(scores, per_image.reshape(3, 2).mean(axis=1), rtol=0, atol=1e-9)
    again = evaluator.scores(live.model)
    np.testing.assert_array_equal(scores, again)
    np.testing.assert_array_equal(evaluator.example_groups(), [0, 0, 1])
    report = evaluator.report(live.model)
    assert report.metric == "clip_score" and list(report.scores) == ["en", "ja"]
    assert evaluator.test_score(live.model) == pytest.approx(np.mean(list(report.scores.values())))
    assert set(evaluator.last_timing) == {"generate_s", "score_s"}


def test_each_image_has_its_own_seed_whatever_the_batch(live, clip_judge, prompts):
    """Image k of prompt `id` starts from the noise of `image_seed(seed, id, k)`: batch size does not matter, and
    the prompt's neighbours do not either."""
    one = ClipEvaluator(_config(clip_judge, prompts, batch_size=1), live.model)
    six = ClipEvaluator(_config(clip_judge, prompts, batch_size=6), live.model)
    a = one.images(live.model, "fit")
    b = six.images(live.model, "fit")
    for (row_a, images_a), (row_b, images_b) in zip(a, b):
        assert row_a == row_b
        for x, y in zip(images_a, images_b):
            assert np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 1
    assert image_seed(3, "en-0", 0) != image_seed(3, "en-0", 1) != image_seed(4, "en-0", 1)
    # another seed draws other images
    other = ClipEvaluator(_config(clip_judge, prompts, seed=4), live.model).images(live.model, "fit", limit=1)
    assert np.asarray(other[0][1][0]).tolist() != np.asarray(a[0][1][0]).tolist()


def test_prompt_embeddings_are_computed_once_unless_a_text_encoder_evolves(live, clip_judge, prompts):
    pipeline = live.model
    calls = []
    hook = pipeline.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        cached = ClipEvaluator(_config(clip_judge, prompts), pipeline)
        first = cached.scores(pipeline)
        cached.scores(pipeline)
        assert len(calls) == 2  # the prompts, and the empty negative prompt of classifier-free guidance
        fresh = ClipEvaluator(_config(clip_judge, prompts), pipeline, text_evolved=True)
        calls.clear()
        np.testing.assert_allclose(fresh.scores(pipeline), first, atol=1e-3)
        fresh.scores(pipeline)
        assert (
            len(calls) == 2 * 2 * 2
        )  # encoded by the pipeline itself in every call (two batches of 4 images)
    finally:
        hook.remove()


def test_non_finite_images_make_a_candidate_failure_scored_zero(live, clip_judge, prompts):
    from hf_m2n2.evolve.executor import LocalExecutor
    from hf_m2n2.evolve.strategy import Candidate

    evaluator = ClipEvaluator(_config(clip_judge, prompts), live.model)
    name = "unet/conv_out.bias"
    saved = live.tensor(name).detach().clone()

    class NaNTarget:
        def write(self, genome):
            live.write(name, torch.full_like(saved, float("nan")))
            return live.model

    class Ops:
        def hash(self, genome):
            return "x"

    try:
        with pytest.raises(EvaluationError, match="non-finite images"):
            evaluator.scores(NaNTarget().write(None))
        executor = LocalExecutor(Ops(), NaNTarget(), evaluator)
        executor.submit(Candidate(genome=None, lineage=None))
        scored = executor.collect()
        assert scored.scores is None and "non-finite images" in scored.error
    finally:
        live.write(name, saved)


def test_timing_splits_only_the_calls_that_drew_images(live, clip_judge, prompts):
    """Without held-out prompts the loop's held-out calls draw nothing: timing.json's `test` records must not carry
    the previous fitness call's generate/score seconds."""
    from hf_m2n2.evolve.executor import LocalExecutor

    evaluator = ClipEvaluator(_config(clip_judge, prompts, test_prompts=None), live.model)

    class Target:
        def write(self, genome):
            return live.model

    executor = LocalExecutor(None, Target(), evaluator, timed=True)
    executor.score(None, "fit")
    assert executor.score(None, "test") is None
    fit, test = executor.timing.records
    assert set(fit) >= {"generate_s", "score_s"}
    assert set(test) == {"kind", "materialize_s", "evaluate_s"}


def test_the_card_snippet_draws_with_the_negative_prompt_the_images_were_scored_with(
    live, clip_judge, prompts
):
    from hf_m2n2.card import CardInfo, pipeline_evolve_card_info

    scoring = ClipEvaluator(_config(clip_judge, prompts, negative_prompt="blurry"), live.model).describe()
    assert scoring["generation"]["negative_prompt"] == "blurry"
    info = CardInfo("evolve", "m", "m", "m2n2", "", [], details={"scoring": scoring})
    usage = pipeline_evolve_card_info(info, seeds=[], pipeline_class="P", family="SD 1.x").details["usage"]
    assert "negative_prompt='blurry'" in usage["arguments"]


def test_bad_sections_are_refused_with_their_path(live, clip_judge, prompts, pipelines, tmp_path):
    with pytest.raises(Exception, match="images_per_prompt"):
        _config(clip_judge, prompts, images_per_prompt=0)
    with pytest.raises(SpecError, match=r"evaluate\.height: 33 is not a multiple of 2"):
        ClipEvaluator(_config(clip_judge, prompts, height=33), live.model)
    with pytest.raises(SpecError, match=r"evaluate\.scheduler: 'NoSuchScheduler'"):
        ClipEvaluator(_config(clip_judge, prompts, scheduler="NoSuchScheduler"), live.model)
    with pytest.raises(SpecError, match=r"evaluate\.model: judge .* is a 'clip_text_model' model, not CLIP"):
        ClipEvaluator(_config(pipelines["sd1"] / "text_encoder", prompts), live.model)
    with pytest.raises(SpecError, match=r"evaluate\.model: cannot load judge"):
        ClipEvaluator(_config(tmp_path / "nowhere", prompts), live.model)


# -- through `hf-m2n2 evolve` ------------------------------------------------------------------------------------


def _spec(pipelines, clip_judge, prompts, **evolve) -> dict:
    return {
        "models": [{"model": str(pipelines["sd1-a"])}, {"model": str(pipelines["sd1-b"])}],
        "genome": {"kind": "blend", "block_size": 4096},
        "evolve": {"algorithm": "m2n2", "budget": 6, "seed": 5, "log_every": 2, **evolve},
        "evaluate": {
            "kind": "clip",
            "model": str(clip_judge),
            "prompts": str(prompts["fit"]),
            "test_prompts": str(prompts["test"]),
            "num_inference_steps": 2,
            "batch_size": 3,
        },
    }


def _write(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return path


def test_spec_defaults_capacity_max_and_evolves_only_the_unet(pipelines, clip_judge, prompts):
    from hf_m2n2.evolve.spec import parse_evolve_spec

    spec = parse_evolve_spec(_spec(pipelines, clip_judge, prompts))
    assert spec.evolve.capacity == "max"
    assert parse_evolve_spec(_spec(pipelines, clip_judge, prompts, capacity="one")).evolve.capacity == "one"


def test_sigkill_then_resume_equals_an_uninterrupted_run(pipelines, clip_judge, prompts, tmp_path, cli):
    spec = _write(
        tmp_path, _spec(pipelines, clip_judge, prompts, checkpoint_every_steps=1, checkpoint_every_s=None)
    )
    killed = tmp_path / "killed"
    at_kill = sigkill_evolve(spec, killed, min_passes=3, timeout=120, fresh_interpreter=False)
    assert 3 <= at_kill < 6
    code, _, err = cli("evolve", "--resume", killed, "-q")
    assert code == 0, err
    code, _, err = cli("evolve", spec, "--out", tmp_path / "straight", "-q")
    assert code == 0, err
    straight = tmp_path / "straight"
    assert (killed / "history.jsonl").read_bytes() == (straight / "history.jsonl").read_bytes()
    assert (killed / "report.json").read_bytes() == (straight / "report.json").read_bytes()
    recipe = json.loads((straight / "model" / "recipe.json").read_text())
    assert recipe["tensors"] and all(name.startswith("unet/") for name in recipe["tensors"])
    assert json.loads((killed / "model" / "recipe.json").read_text())["blend"] == recipe["blend"]
    report = json.loads((straight / "report.json").read_text())
    assert list(report) == ["sd1-a", "sd1-b", "m2n2-merge"] and list(report["m2n2-merge"]) == ["en", "ja"]
    timing = json.loads((straight / "timing.json").read_text())
    assert timing["fit"]["generate_s_total"] > 0 and timing["fit"]["score_s_total"] > 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompts": "EMPTY"}, "evaluate.prompts: {EMPTY} has no prompts"),
        ({"images_per_prompt": 0}, "evaluate.images_per_prompt"),
        ({"model": "TEXT_ENCODER"}, "evaluate.model: judge"),
        ({"height": 31}, "evaluate.height: 31 is not a multiple of 2"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    pipelines, clip_judge, prompts, tmp_path, cli, change, message
):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    values = {"EMPTY": str(empty), "TEXT_ENCODER": str(pipelines["sd1"] / "text_encoder")}
    spec = _spec(pipelines, clip_judge, prompts)
    spec["evaluate"].update({k: values.get(v, v) if isinstance(v, str) else v for k, v in change.items()})
    out = tmp_path / "run"
    code, _, err = cli("evolve", _write(tmp_path, spec), "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert message.format(EMPTY=empty) in err
    assert not out.exists()


def test_seeds_whose_unets_differ_in_shape_are_refused(pipelines, clip_judge, prompts, tmp_path, cli):
    spec = _spec(pipelines, clip_judge, prompts)
    spec["models"] = [{"model": str(pipelines["sd1-a"])}, {"model": str(pipelines["sd2"])}]
    out = tmp_path / "run"
    code, _, err = cli("evolve", _write(tmp_path, spec), "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "sd2" in err and not out.exists()


def test_sdxl_pipelines_score_the_same_with_cached_embeddings(pipelines, clip_judge, prompts):
    """SDXL's encode_prompt gives four tensors (with the pooled ones): cached, they draw what the prompts draw."""
    from hf_m2n2.live_pipeline import LivePipeline
    from hf_m2n2.seeds import open_seeds

    [seed] = open_seeds([str(pipelines["sdxl-a"])])
    pipeline = LivePipeline(seed).model
    config = _config(clip_judge, prompts, images_per_prompt=1, guidance_scale=3.0, negative_prompt="blurry")
    cached = ClipEvaluator(config, pipeline)
    assert set(cached._prompt_embeds(pipeline, cached.fitness, "fit")) == {
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    }
    as_text = ClipEvaluator(config, pipeline, text_evolved=True)
    np.testing.assert_allclose(cached.scores(pipeline), as_text.scores(pipeline), atol=1e-3)


def test_an_evaluator_that_cannot_score_the_seeds_kind_is_refused(
    seeds, clip_judge, prompts, pipelines, tmp_path, cli
):
    spec = _spec(pipelines, clip_judge, prompts)
    spec["models"] = [{"model": str(seeds["a"])}, {"model": str(seeds["b"])}]
    out = tmp_path / "run"
    code, _, err = cli("evolve", _write(tmp_path, spec), "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "evaluate.kind: clip scores pipeline models; the seeds are causal_lm models" in err
    assert not out.exists()


JUDGE_CODE = """
from pathlib import Path

Path({marker!r}).write_text("the judge's code ran")

from transformers import CLIPConfig, CLIPModel


class MarkerJudgeConfig(CLIPConfig):
    model_type = "m2n2_judge"


class MarkerJudge(CLIPModel):
    config_class = MarkerJudgeConfig
"""


def test_another_judge_runs_its_code_only_when_asked(clip_judge, prompts, live, tmp_path):
    """A judge with its own code (auto_map) is refused, its code not run, unless `trust_remote_code: true`; then it
    loads through AutoModel/AutoProcessor and scores as the CLIP model it wraps."""
    import shutil

    judge = tmp_path / "judge"
    shutil.copytree(clip_judge, judge)
    marker = tmp_path / "ran"
    (judge / "marker.py").write_text(JUDGE_CODE.format(marker=str(marker)))
    config = json.loads((judge / "config.json").read_text())
    config.update(
        model_type="m2n2_judge",
        architectures=["MarkerJudge"],
        auto_map={"AutoConfig": "marker.MarkerJudgeConfig", "AutoModel": "marker.MarkerJudge"},
    )
    (judge / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecError, match=r"evaluate\.model: .*trust_remote_code"):
        ClipEvaluator(_config(judge, prompts), live.model)
    assert not marker.exists()
    trusted = ClipEvaluator(_config(judge, prompts, trust_remote_code=True), live.model)
    assert marker.exists() and type(trusted.judge).__name__ == "MarkerJudge"
    plain = ClipEvaluator(_config(clip_judge, prompts), live.model)
    np.testing.assert_allclose(trusted.scores(live.model), plain.scores(live.model), atol=1e-5)


def test_map_elites_on_prompts_without_groups_names_what_to_add(pipelines, clip_judge, tmp_path, cli):
    """A clip fitness gives MAP-Elites its descriptors from the prompt rows' `group`: without them the one-line
    error says so, not a `groups_callable` key the clip section does not have."""
    plain = tmp_path / "plain.txt"
    plain.write_text("a red circle\na blue square\n")
    spec = _spec(pipelines, clip_judge, {"fit": plain, "test": plain}, algorithm="map_elites")
    out = tmp_path / "run"
    code, _, err = cli("evolve", _write(tmp_path, spec), "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "groups_callable" not in err and "'group' on every prompt row" in err
    assert not out.exists()


def test_two_clip_parts_keep_their_previews_apart(live, clip_judge, prompts, tmp_path):
    """In a list of parts, part i > 0 keeps its views under RUN/part<i>/: two CLIP parts never share preview/."""
    from hf_m2n2.evaluate import EvaluationContext, build_evaluator

    parts = [_config(clip_judge, prompts, weight=1), _config(clip_judge, prompts, weight=1, seed=9)]
    context = EvaluationContext(model=live.model, run_dir=tmp_path, model_kind="pipeline")
    evaluator = build_evaluator(parts, context)
    scores = evaluator.scores(live.model)
    evaluator.candidate_scored(1, scores)
    first = json.loads((tmp_path / "preview" / "best.json").read_text())
    second = json.loads((tmp_path / "part1" / "preview" / "best.json").read_text())
    assert first["candidate"] == second["candidate"] == 1
    assert first["score"] == pytest.approx(scores[:3].mean()) and second["score"] == pytest.approx(
        scores[3:].mean()
    )


def test_a_few_images_take_the_groups_in_turn(evaluator, live):
    """A grid's few columns show every group: images(limit=2) draws the first en and the first ja prompt."""
    rows = [row.id for row, _ in evaluator.images(live.model, "fit", limit=2)]
    assert rows == ["en-0", "ja-0"]
    assert [row.id for row, _ in evaluator.images(live.model, "fit")] == ["en-0", "ja-0", "en-1"]
