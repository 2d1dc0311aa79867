"""The bundled video model's autoencoder and the latents it caches (``scripts/train_video_model.py`` stages
``vae``, ``encode`` and ``frames``).

An ``AutoencoderKLWan`` (:data:`VAE_CONFIG`: 17x64x64x3 clips <-> 9x16x16x8 latents) trained with L1 + MSE on its
unclamped reconstructions (:func:`decode_unclamped`) and a small KL term, on random ``VAE_WINDOW``-frame windows of
freshly rendered training clips. ``vae`` continues from its last checkpoint when run again (model, optimiser, step
and the data generator), so a run may span sessions; ``vae --decoder-only`` fine-tunes the decoder with the encoder
frozen, so that latents, and a transformer trained on them, stay valid.

``encode`` (:func:`encode`) caches the normalised latent means of the training clips and their caption states;
``frames`` (:func:`encode_frames`) caches one-frame clips of every training pair (the first frame of a clip, which the
causal VAE encodes alone, as it encodes a clip's first frame), normalised with the clip latents' statistics.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from render_clips import FRAMES, ClipSpec, caption, clip_specs, load_emoji, split_pairs
from safetensors.torch import save_file
from tqdm import tqdm
from train_default_model import _flat_optimizer, _restore_optimizer, load_checkpoint, model_weights, save_checkpoint
from video_data import caption_states, latent_statistics, object_split, render_batch, rendered_batches

logger = logging.getLogger("train_video_model")  # every stage logs under the script's name

VAE_WINDOW = 9  # frames per VAE training clip (5 latent frames)

VAE_CONFIG = dict(
    base_dim=16,
    z_dim=8,
    dim_mult=[1, 2, 4],  # two down blocks: spatial factor 4
    num_res_blocks=1,
    temperal_downsample=[False, True],  # temporal factor 2
    scale_factor_temporal=2,
    scale_factor_spatial=4,
    latents_mean=[0.0] * 8,  # replaced by the dataset statistics at export
    latents_std=[1.0] * 8,
)


# -- VAE -----------------------------------------------------------------------------------------------------


def new_vae(**overrides):
    """An untrained ``AutoencoderKLWan`` of :data:`VAE_CONFIG` (``overrides`` replace entries, for tests)."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(**{**VAE_CONFIG, **overrides})


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode(z).sample`` before its clamp to [-1, 1].

    The clamp has no gradient where the decoder overshoots, and on white backgrounds it does overshoot: trained
    through ``decode``, the decoder learns to paint everything white past +1 and then gets no signal for the
    ink. This is ``AutoencoderKLWan._decode`` (frame by frame with its causal cache) without the clamp.
    """
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        frames.append(
            vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0)
        )
    vae.clear_cache()
    return torch.cat(frames, 2)


def vae_loss(vae, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L1 + MSE reconstruction and a small KL term; returns ``(loss, reconstruction, kl)``."""
    posterior = vae.encode(clips).latent_dist
    recon = decode_unclamped(vae, posterior.sample())
    rec = F.l1_loss(recon, clips) + F.mse_loss(recon, clips)
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1 - posterior.logvar).mean()
    return rec + 1e-4 * kl, rec, kl


def _random_specs(generator: torch.Generator, specs: list[ClipSpec], batch: int) -> list[ClipSpec]:
    """``batch`` clips of the training pairs with fresh details, drawn from ``generator``."""
    index = torch.randint(len(specs), (batch,), generator=generator).tolist()
    seeds = torch.randint(2**31, (batch,), generator=generator).tolist()
    return [ClipSpec(specs[i].index, specs[i].motion, seed) for i, seed in zip(index, seeds)]


def _vae_state(args: argparse.Namespace):
    """The VAE, its optimiser, generator, checkpoint path and step, resumed when a checkpoint exists.

    ``--decoder-only`` fine-tunes the decoder with the encoder frozen, in its own checkpoint
    ``vae_decoder.safetensors`` that starts from ``vae.safetensors`` (or, without it, from the VAE exported under
    ``--init``): the latents, and a transformer trained on them, stay valid while the reconstructions improve.
    """
    vae = new_vae().to(args.device).train()
    logger.info("vae: %.2fM parameters", sum(p.numel() for p in vae.parameters()) / 1e6)
    path, step = args.work / ("vae_decoder.safetensors" if args.decoder_only else "vae.safetensors"), 0
    if args.decoder_only:
        vae.load_state_dict(load_vae(args.work, init=args.init).state_dict())  # an export's weights are fp16
        vae.float().train()
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    trained = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    if path.exists():
        tensors, meta = load_checkpoint(path)
        vae.load_state_dict(model_weights(tensors))
        _restore_optimizer(optimizer, tensors, meta["optimizer"])
        generator.set_state(tensors["generator"])
        step = meta["step"]
    return vae, optimizer, generator, path, step


def train_vae(args: argparse.Namespace) -> None:
    """Train the autoencoder on random ``VAE_WINDOW``-frame windows of freshly rendered training clips."""
    torch.manual_seed(args.seed)
    images, _, split = load_emoji()
    pairs = clip_specs(split, "train", 1, seed=args.seed)
    vae, optimizer, generator, path, step = _vae_state(args)
    deadline, last_save = time.time() + 60 * args.minutes, time.time()
    bar = tqdm(desc="vae", initial=step, mininterval=30)
    while time.time() < deadline and step < args.max_steps:
        start = int(torch.randint(FRAMES - VAE_WINDOW + 1, (), generator=generator))
        clips = render_batch(images, _random_specs(generator, pairs, args.vae_batch))
        clips = clips[:, :, start : start + VAE_WINDOW].to(args.device)
        loss, rec, kl = vae_loss(vae, clips)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update()
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.3f}", refresh=False)
        if time.time() - last_save > 60 * args.save_minutes:
            _save_vae(path, vae, optimizer, generator, step)
            last_save = time.time()
    _save_vae(path, vae, optimizer, generator, step)
    logger.info("vae: %d steps, last reconstruction loss %.4f", step, rec.item())


def _save_vae(path: Path, vae, optimizer, generator: torch.Generator, step: int) -> None:
    opt_tensors, opt_meta = _flat_optimizer(optimizer)
    model = {f"model.{k}": v.cpu() for k, v in vae.state_dict().items()}
    opt_tensors = {k: v.cpu() for k, v in opt_tensors.items()}
    meta = {"step": step, "optimizer": opt_meta}
    save_checkpoint(path, {**model, **opt_tensors, "generator": generator.get_state()}, meta)
    logger.info("vae checkpoint at step %d", step)


def load_vae(work: Path, device: str = "cpu", init: Path | None = None):
    """The trained autoencoder, in eval mode: ``work/vae_decoder.safetensors`` if there is one, else
    ``work/vae.safetensors``, else (a new session without checkpoints) the VAE exported under ``init``."""
    from diffusers import AutoencoderKLWan

    candidates = [work / "vae_decoder.safetensors", work / "vae.safetensors"]
    found = next((path for path in candidates if path.exists()), None)
    if found is None and init is not None:
        logger.info("vae: no checkpoint under %s; using the export in %s", work, init)
        return AutoencoderKLWan.from_pretrained(init / "vae", torch_dtype=torch.float32).to(device).eval()
    vae = new_vae()
    tensors, _ = load_checkpoint(found or candidates[1])
    vae.load_state_dict(model_weights(tensors))
    return vae.to(device).eval().requires_grad_(False)


# -- cached inputs -------------------------------------------------------------------------------------------


def encode(args: argparse.Namespace) -> None:
    """Cache normalised latent means of ``--clips-per-object`` clips per training object, and caption states."""
    images, names, split = load_emoji()
    specs = clip_specs(object_split(split, names, args.objects), "train", args.clips_per_object, seed=args.seed)
    specs = specs[: args.max_clips]
    vae = load_vae(args.work, args.device, args.init)
    latents, batch = [], 16 if args.device == "cpu" else 128
    batches = rendered_batches(images, specs, batch, args.workers)
    with torch.no_grad():
        for clips in tqdm(batches, desc="encode", total=-(-len(specs) // batch), mininterval=30):
            latents.append(vae.encode(clips.to(args.device)).latent_dist.mean.cpu())
    latents = torch.cat(latents)  # (N, 8, 9, 16, 16)
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4))
    if list(vae.config.latents_std) != VAE_CONFIG["latents_std"]:  # an exported VAE: keep the normalisation
        mean, std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)  # its model learned
    latents = (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    captions = [caption(names[s.index], s.motion) for s in specs]
    text = caption_states(args, [*captions, ""])
    save_file(
        {"latents": latents.half().contiguous(), "text": text[:-1].half().contiguous(), "empty_text": text[-1:]},
        args.work / "encoded.safetensors",
        metadata={"latents_mean": json.dumps(mean.tolist()), "latents_std": json.dumps(std.tolist())},
    )
    logger.info("encoded %d clips; latent mean %s std %s", len(specs), mean.tolist(), std.tolist())


def encode_frames(args: argparse.Namespace) -> None:
    """Cache the first frame of a clip of every training object/motion pair as a one-frame clip.

    A one-frame clip is what the causal VAE makes of a clip's first frame, so these latents are the first latent
    frame of a clip of that pair; they are normalised with the clip latents' statistics (from
    ``encoded.safetensors``, which must exist) and captioned as the clip would be.
    """
    statistics = latent_statistics(args)
    mean, std = (torch.tensor(statistics[key]).view(1, -1, 1, 1, 1) for key in ("latents_mean", "latents_std"))
    images, names, split = load_emoji()
    rng = np.random.default_rng(args.seed + 1)
    pairs = split_pairs(object_split(split, names, args.objects))["train"][: args.max_clips]
    specs = [ClipSpec(index, motion, int(rng.integers(2**31))) for index, motion in pairs]
    vae = load_vae(args.work, args.device, args.init)
    latents, batches = [], rendered_batches(images, specs, 64, args.workers, frames=1)
    with torch.no_grad():
        for clips in tqdm(batches, desc="frames", total=-(-len(specs) // 64), mininterval=30):
            latents.append(vae.encode(clips.to(args.device)).latent_dist.mean.cpu())
    latents = (torch.cat(latents) - mean) / std  # (N, 8, 1, 16, 16)
    text = caption_states(args, [caption(names[s.index], s.motion) for s in specs])
    save_file(
        {"latents": latents.half().contiguous(), "text": text.half().contiguous()}, args.work / "frames.safetensors"
    )
    logger.info("encoded %d one-frame clips", len(specs))
