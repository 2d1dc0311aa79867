"""The metric registry: what each metric computes, names, and what happens when weights are missing."""

import importlib.util
import sys
import types

import pytest
import torch

from accel.eval.metrics import METRICS, PSNR_CAP_DB, MetricInputs, MetricSuite, MetricWeights

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(seed: int, n: int = 6, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _inputs(images, reference):
    return MetricInputs(images=images, reference=reference, prompts=tuple(f"prompt {i}" for i in range(len(images))))


def test_psnr_ssim_of_identical_images_are_capped_and_one():
    reference = _images(0)
    results = MetricSuite(["psnr", "ssim"]).compute(_inputs(reference, reference))
    assert results["PSNR"]["value"] == PSNR_CAP_DB and results["SSIM"]["value"] == pytest.approx(1.0)
    assert results["PSNR"]["better"] == "higher" and "same prompt and seed" in results["PSNR"]["computed"]


def test_psnr_matches_the_definition():
    reference = _images(0)
    noisy = (reference.int() + 4).clamp(0, 255).to(torch.uint8)
    mse = ((noisy.float() - reference.float()) / 255).pow(2).mean(dim=(1, 2, 3))
    expected = (10 * torch.log10(1 / mse)).mean()
    assert MetricSuite(["psnr"]).compute(_inputs(noisy, reference))["PSNR"]["value"] == pytest.approx(float(expected))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed here")
def test_lpips_without_torchvision_is_unavailable_with_the_extra_to_install():
    results = MetricSuite(["lpips"]).compute(_inputs(_images(0), _images(1)))
    assert results["LPIPS-alex"]["value"] is None
    assert "torchvision" in results["LPIPS-alex"]["unavailable"] and "[lpips]" in results["LPIPS-alex"]["unavailable"]


def test_fid_and_kid_name_their_extractor_and_reference():
    reference, other = _images(0, n=8), _images(1, n=8)
    suite = MetricSuite(["fid"])
    same = suite.compute(_inputs(reference, reference))
    names = set(same)
    assert names in ({"FID-EffNetLite0", "KID-EffNetLite0"}, {"FID-InceptionV3", "KID-InceptionV3"})
    fid_name = sorted(names)[0]
    assert same[fid_name]["value"] == pytest.approx(0, abs=1e-3)
    assert "full-compute images" in same[fid_name]["computed"]
    assert suite.compute(_inputs(other, reference))[fid_name]["value"] > 1


def test_fid_against_a_real_set():
    real = _images(5, n=10)
    results = MetricSuite(["fid"], real=real, real_label="emoji64.npz").compute(_inputs(_images(0), _images(0)))
    fid = next(v for k, v in results.items() if k.startswith("FID-"))
    assert "emoji64.npz (10 images)" in fid["computed"] and fid["value"] > 0


def test_clip_falls_back_to_the_bundled_alignment_scorer(monkeypatch):
    class Scorer:
        metric_name = "alignment-stub"

        def score(self, images, prompts):
            assert images.dtype == torch.float32 and 0 <= float(images.min()) and float(images.max()) <= 1
            return torch.full((len(prompts),), 42.0)

    stub = types.ModuleType("accel.eval.alignment")
    stub.load_alignment_scorer = Scorer
    monkeypatch.setitem(sys.modules, "accel.eval.alignment", stub)
    monkeypatch.setitem(sys.modules, "accel.eval.clip_score", None)  # as without open-clip: import fails
    results = MetricSuite(["clip"]).compute(_inputs(_images(0), _images(1)))
    assert results["alignment-stub"]["value"] == 42.0 and "--weights-clip" in results["alignment-stub"]["note"]


def test_missing_alignment_scorer_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "accel.eval.alignment", None)  # import fails
    monkeypatch.setitem(sys.modules, "accel.eval.clip_score", None)
    results = MetricSuite(["clip"]).compute(_inputs(_images(0), _images(1)))
    assert results["alignment"]["value"] is None and "neither CLIP score nor" in results["alignment"]["unavailable"]


def test_named_weight_files_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="clip weights file not found"):
        MetricWeights(clip=str(tmp_path / "open_clip.bin"))
    with pytest.raises(ValueError, match="lpips_net must be one of"):
        MetricWeights(lpips_net="resnet")


def test_unknown_metric_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: .*psnr"):
        MetricSuite(["psnr", "beauty"])
    assert set(METRICS) == {"psnr", "ssim", "lpips", "fid", "clip", "motion"}


def test_clip_score_is_used_where_its_weights_exist(monkeypatch, tmp_path):
    checkpoint = tmp_path / "clip.bin"
    checkpoint.write_bytes(b"weights")

    class Clip:
        metric_name = "CLIP-score-ViT-B-32/clip.bin"

        def score(self, images, prompts):
            return torch.full((len(prompts),), 30.0)

    stub = types.ModuleType("accel.eval.clip_score")
    stub.load_clip_scorer = lambda model, checkpoint_path: Clip()
    monkeypatch.setitem(sys.modules, "accel.eval.clip_score", stub)
    suite = MetricSuite(["clip"], MetricWeights(clip=str(checkpoint)))
    results = suite.compute(_inputs(_images(0), _images(1)))
    assert results["CLIP-score-ViT-B-32/clip.bin"]["value"] == 30.0
    assert "note" not in results["CLIP-score-ViT-B-32/clip.bin"]


def test_without_torchmetrics_psnr_still_works_and_the_rest_name_the_extra(monkeypatch):
    for name in [n for n in sys.modules if n == "torchmetrics" or n.startswith("torchmetrics.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    reference = _images(0, n=8)
    results = MetricSuite(["psnr", "ssim", "fid"]).compute(_inputs(_images(1, n=8), reference))
    assert 0 < results["PSNR"]["value"] < PSNR_CAP_DB
    unavailable = {name: r["unavailable"] for name, r in results.items() if r["value"] is None}
    # against the full-compute images (paired) FID and KID are accel's own code; a real set needs torchmetrics' KID
    assert set(unavailable) == {"SSIM"}
    against_real = MetricSuite(["fid"], real=_images(2, n=8)).compute(_inputs(_images(1, n=8), reference))
    unavailable.update({name: r["unavailable"] for name, r in against_real.items() if r["value"] is None})
    assert any(n.startswith("FID") for n in unavailable)
    assert all("[eval]" in reason for reason in unavailable.values()), unavailable
