"""Shared fixtures: seeded tiny models and a tiny stock diffusers PixArt pipeline built offline."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread: the tiny models are launch-bound and run many times faster on a busy CPU than with
    several threads spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "a the red green blue cat dog apple face smiling car tree house star moon sun".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=16
    )


def tiny_t5_encoder():
    """A random one-layer T5 encoder (width 16, 32 ids: :func:`_word_tokenizer`'s fit) from the global seed."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)
    )


def tiny_pipeline(pipeline_class, text_encoder, vae, transformer, scheduler):
    """``pipeline_class`` over tiny parts and :func:`_word_tokenizer`: no progress bar, every module in eval mode
    without gradients."""
    pipe = pipeline_class(
        tokenizer=_word_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    for module in (text_encoder, vae, transformer):
        module.eval().requires_grad_(False)
    return pipe


def build_tiny_pixart_pipeline(num_layers: int = 4):
    """A stock ``PixArtAlphaPipeline`` with tiny random T5, VAE and transformer; no download."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    text_encoder = tiny_t5_encoder()
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        caption_channels=16,
        cross_attention_dim=16,
        patch_size=2,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    return tiny_pipeline(PixArtAlphaPipeline, text_encoder, vae, transformer, scheduler)


@pytest.fixture
def tiny_pixart_pipeline():
    return build_tiny_pixart_pipeline()


#: flags for quick ``accel eval`` runs on a tiny pipeline
FAST = ["--steps", "4", "--metrics", "psnr", "--timing-repeats", "1", "--timing-warmup", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny PixArt pipeline saved to a folder, once per test module."""
    path = tmp_path_factory.mktemp("tiny-pixart")
    build_tiny_pixart_pipeline().save_pretrained(path)
    return path
