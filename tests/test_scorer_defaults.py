"""With network the real scorers are the defaults (Inception-V3 FID, CLIP score, downloaded as their libraries do);
offline the bundled stand-ins score and the report's first sentence says so."""

import sys
import types

import torch

from accel.eval.feature_metrics import load_prompt_scorer, stand_in_note
from accel.eval.metrics import MetricInputs, MetricSuite, MetricWeights
from accel.eval.report import run_summary


def _images(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _clip_module(monkeypatch, online: bool) -> list:
    """A stand-in ``accel.eval.clip_score`` whose checkpoint is not cached and downloads only when ``online``."""
    calls = []

    class Clip:
        metric_name = "CLIP-score-ViT-B-32/openai"

        def score(self, images, prompts):
            return torch.full((len(prompts),), 30.0)

    def load_clip_scorer(model_name, pretrained="openai", *, checkpoint_path=None, allow_download=False, **kw):
        calls.append(allow_download)
        if not allow_download:
            raise FileNotFoundError("not in open-clip's cache")
        if not online:
            raise OSError("Name or service not known")
        return Clip()

    stub = types.ModuleType("accel.eval.clip_score")
    stub.load_clip_scorer = load_clip_scorer
    monkeypatch.setitem(sys.modules, "accel.eval.clip_score", stub)
    return calls


def _alignment_module(monkeypatch) -> None:
    class Alignment:
        metric_name = "alignment-stub"

        def score(self, images, prompts):
            return torch.full((len(prompts),), 7.0)

    stub = types.ModuleType("accel.eval.alignment")
    stub.load_alignment_scorer = Alignment
    monkeypatch.setitem(sys.modules, "accel.eval.alignment", stub)


def test_clip_score_is_downloaded_by_default_and_only_when_allowed(monkeypatch):
    calls = _clip_module(monkeypatch, online=True)
    _alignment_module(monkeypatch)
    scorer, fallback = load_prompt_scorer(MetricWeights())
    assert scorer.metric_name.startswith("CLIP-score") and fallback is None and calls == [False, True]
    calls.clear()
    scorer, fallback = load_prompt_scorer(MetricWeights(download=False))
    assert scorer.metric_name == "alignment-stub" and "not in open-clip's cache" in fallback and calls == [False]


def test_offline_the_stand_in_scores_and_the_report_headline_says_so(monkeypatch):
    _clip_module(monkeypatch, online=False)
    _alignment_module(monkeypatch)
    inputs = MetricInputs(images=_images(0), reference=_images(1), prompts=["a", "b"])
    metrics = MetricSuite(["clip"]).compute(inputs)
    assert "downloading it failed" in metrics["alignment-stub"]["stand_in"]
    results = {"trials": [{"metrics": metrics}, {"metrics": {"PSNR": {"value": 30.0}}}]}
    note = stand_in_note(results)
    assert note.startswith("Offline stand-in") and "alignment-stub instead of CLIP score" in note
    assert stand_in_note({"trials": [{"metrics": {"PSNR": {"value": 30.0}}}]}) == ""
    shared = {"stand_in": "E instead of Inception-V3: offline"}  # FID and KID: one stand-in, said once
    assert stand_in_note({"trials": [{"metrics": {"FID-E": shared, "KID-E": shared}}]}).count("offline") == 1
    run = {
        "config": {"steps": 20, "guidance_scale": 4.0},
        "model": {"model": "m", "pipeline_class": "P"},
        "transformer_class": "T",
        "seeds": [0, 1],
        "prompts_source": "built-in",
        "device": "cpu",
        "num_processes": 1,
        "created": "now",
    }
    assert "instead of CLIP score" in run_summary({**results, "run": run})
    assert "stand-in" not in run_summary({"trials": [], "run": run})


def test_inception_download_failure_falls_back_with_the_reason(monkeypatch):
    from accel.eval import feature_metrics, fid

    asked = []

    def load_inception_features(path=None, *, download=False):
        asked.append(download)
        raise FileNotFoundError("Inception-V3 FID weights are not at X and downloading them failed (URLError)")

    monkeypatch.setattr(fid, "load_inception_features", load_inception_features)
    extractor, reason = feature_metrics._feature_extractor(MetricWeights())
    assert asked == [True] and "downloading them failed" in reason and "EffNet" in extractor.metric_suffix
    feature_metrics._feature_extractor(MetricWeights(download=False))
    assert asked == [True, False]
