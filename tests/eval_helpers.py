"""Helpers of the evaluation tests: a small, fast run on the tiny PixArt pipeline, tiny video pipelines, and a
counter of self-attention calls."""

from __future__ import annotations

from accel.eval.config import EvalConfig
from accel.eval.cost import TimingConfig

PROMPTS = ("a red apple", "a blue car", "a green tree", "the sun")


def small_config(**overrides) -> EvalConfig:
    """Four prompts, 4 steps, one timed round, fidelity metrics only (unless overridden)."""
    values = dict(
        prompts=PROMPTS,
        methods=("full", "fora-2"),
        steps=4,
        batch_size=2,
        metrics=("psnr", "ssim"),
        timing=TimingConfig(warmup=0, repeats=1),
        threads=1,
    )
    return EvalConfig(**{**values, **overrides})


VIDEO_PROMPTS = ("a red apple", "a blue car")


def build_tiny_wan_pipeline():
    """A stock ``WanPipeline`` with a tiny random T5, Wan VAE and 2-block transformer; no download. Call it with
    :data:`TINY_VIDEO_KWARGS`: clips of 5 frames of 16 x 16 (latents 3 x 8 x 8, 48 tokens)."""
    import torch
    from conftest import tiny_pipeline, tiny_t5_encoder
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    text_encoder = tiny_t5_encoder()
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[True],
        scale_factor_temporal=2,
        scale_factor_spatial=2,
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=2.0)
    return tiny_pipeline(WanPipeline, text_encoder, vae, transformer, scheduler)


#: call arguments of :func:`build_tiny_wan_pipeline`'s pipeline
TINY_VIDEO_KWARGS = {"height": 16, "width": 16, "num_frames": 5}


def build_tiny_ltx_pipeline():
    """A stock ``LTXPipeline`` with a tiny random T5, LTX-Video VAE (8x spatial and temporal compression) and the
    2-block transformer of ``tiny_models.LTX``; no download. Call it with :data:`TINY_LTX_KWARGS`: clips of 9
    frames of 32 x 32 (the pipeline's least size; latents 2 x 4 x 4, 32 tokens)."""
    import torch
    from conftest import tiny_pipeline, tiny_t5_encoder
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline
    from tiny_models import LTX

    torch.manual_seed(0)
    text_encoder = tiny_t5_encoder()
    vae = AutoencoderKLLTXVideo(
        latent_channels=LTX.config["in_channels"],
        block_out_channels=(8,) * 4,
        decoder_block_out_channels=(8,) * 4,
        layers_per_block=(1,) * 5,
        decoder_layers_per_block=(1,) * 5,
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4,
        patch_size=1,
    )
    transformer = LTX.model_class(**{**LTX.config, "caption_channels": text_encoder.config.d_model})
    scheduler = FlowMatchEulerDiscreteScheduler()
    return tiny_pipeline(LTXPipeline, text_encoder, vae, transformer, scheduler)


#: call arguments of :func:`build_tiny_ltx_pipeline`'s pipeline (the word tokenizer's 16 tokens, not LTX's 128)
TINY_LTX_KWARGS = {"height": 32, "width": 32, "num_frames": 9, "max_sequence_length": 16}


def build_tiny_unet_pipeline():
    """A stock ``StableDiffusionPipeline`` (a UNet, no transformer) with tiny random CLIP text encoder, VAE and
    UNet; no download."""
    import torch
    from conftest import _word_tokenizer
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
        )
    )
    scheduler = DDIMScheduler(clip_sample=False)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_word_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_wan22_pipeline(boundary_ratio: float = 0.5):
    """:func:`build_tiny_wan_pipeline` as Wan 2.2: a second, differently seeded transformer ``transformer_2`` (the
    low-noise expert) runs the steps whose timestep is below ``boundary_ratio`` of the training timesteps."""
    import torch
    from diffusers import WanPipeline, WanTransformer3DModel

    pipe = build_tiny_wan_pipeline()
    torch.manual_seed(1)
    transformer_2 = WanTransformer3DModel(**pipe.transformer.config).eval().requires_grad_(False)
    pipe = WanPipeline(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        scheduler=pipe.scheduler,
        transformer=pipe.transformer,
        transformer_2=transformer_2,
        boundary_ratio=boundary_ratio,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def self_attention_calls(pipe, run) -> int:
    """Calls of ``pipe``'s blocks' self-attention query projections while ``run()`` runs (made only when
    self-attention computes)."""
    calls = []
    blocks = pipe.transformer.transformer_blocks
    handles = [b.attn1.to_q.register_forward_pre_hook(lambda *_: calls.append(1)) for b in blocks]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return len(calls)
