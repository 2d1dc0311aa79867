"""The bundled default model loads offline into a stock PixArtAlphaPipeline and generates."""

import pytest
import torch

from accel.pipelines.default import DEFAULT_CALL_KWARGS, DEFAULT_MODEL_DIR, load_default_pipeline

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "transformer").is_dir(), reason="the default model has not been exported"
)


@pytest.fixture(scope="module")
def pipe():
    return load_default_pipeline()


def test_stock_pipeline_generates_a_64px_image(pipe):
    from diffusers import PixArtAlphaPipeline

    assert type(pipe) is PixArtAlphaPipeline
    generator = torch.Generator().manual_seed(0)
    output = pipe("red apple", num_inference_steps=4, generator=generator, output_type="pt", **DEFAULT_CALL_KWARGS)
    images = output.images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.05


def test_transformer_round_trips_save_pretrained(pipe, tmp_path):
    from diffusers import PixArtTransformer2DModel

    pipe.transformer.save_pretrained(tmp_path)
    loaded = PixArtTransformer2DModel.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(pipe.transformer.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_folder_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="lacks"):
        load_default_pipeline(tmp_path)


def test_bundled_front_fits_the_bundled_model(pipe):
    from accel.caching import layout_of, load_front
    from accel.pipelines.default import DEFAULT_FRONT_DIR

    front = load_front(DEFAULT_FRONT_DIR)
    assert len(front) >= 4
    for schedule in front:
        schedule.check_layout(layout_of(pipe))
        assert {"speedup", "psnr"} <= set(schedule.metrics)
    assert front.pick(target_speedup=2.0).metrics["speedup"] >= 2.0
