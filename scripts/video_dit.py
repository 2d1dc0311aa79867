"""The bundled video model's transformer, its export, samples and scores (``scripts/train_video_model.py``
stages ``dit``, ``export``, ``sample``, ``roundtrip`` and ``gap``).

A ``WanTransformer3DModel`` (:data:`DIT_CONFIG`: 576 tokens a clip) trained with rectified flow, EMA and caption
dropout on the cached latents. ``dit`` continues from its last checkpoint when run again (model, EMA, optimiser,
step and the noise generator), so a run may span sessions. ``dit --frame-batch N`` trains on images and video
jointly, as Wan does: each step adds the loss of ``N`` one-frame clips (64 tokens each) to the loss of the video
batch, so object appearance is learnt at a ninth of the cost per sample; without the ``frames`` stage's file, the
one-frame clips are the first latent frames of the encoded clips. ``dit --decay-at-deadline`` lets the lr fall
linearly to zero at the ``--minutes`` deadline; ``dit --init ... --reinit-text`` starts the caption path
(:func:`is_text_path`) afresh and loads the rest from an export.

:func:`export` writes the diffusers folder (EMA transformer and VAE in fp16, the flow scheduler, a training
summary); :func:`sample` generates held-out pairs and :func:`roundtrip` passes held-out clips through the exported
VAE, each writing a strip of frames (:func:`save_strip`); :func:`gap` prints how much an export uses the object's
name (:func:`caption_gap`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from render_clips import FRAMES, SIZE, ClipSpec, caption, clip_specs, load_emoji, split_pairs
from safetensors.torch import load_file
from tqdm import tqdm
from train_default_model import (
    _ema_update,
    _flat_optimizer,
    _restore_optimizer,
    load_checkpoint,
    model_weights,
    save_checkpoint,
    strip_load_paths,
)
from video_data import TEXT_LENGTH, latent_statistics, object_split, render_batch, stage_output
from video_vae import VAE_CONFIG, load_vae

logger = logging.getLogger("train_video_model")  # every stage logs under the script's name

# the scheduler's sigma shift at sampling time: on 64 training-split object/motion pairs (20 steps, guidance 4,
# the 9,070-step export) FID-EffNetLite0 was 172.0 / 168.6 / 166.6 / 165.6 / 165.4 at shift 1 / 2 / 3 / 4 / 5
FLOW_SHIFT = 5.0

DIT_CONFIG = dict(
    patch_size=[1, 2, 2],  # 9 x 16 x 16 latents -> 9 x 8 x 8 = 576 tokens
    num_attention_heads=4,
    attention_head_dim=48,
    in_channels=8,
    out_channels=8,
    text_dim=384,
    freq_dim=256,
    ffn_dim=768,
    num_layers=8,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)


# -- transformer ---------------------------------------------------------------------------------------------


def new_transformer(**overrides):
    """An untrained ``WanTransformer3DModel`` of :data:`DIT_CONFIG` (``overrides`` replace entries, for tests)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**{**DIT_CONFIG, **overrides})


def is_text_path(name: str) -> bool:
    """Whether transformer parameter ``name`` belongs to the path captions take: the caption embedder
    (``condition_embedder.text_embedder``) and each block's cross-attention (``attn2``) and its norm (``norm2``).

    ``dit --init ... --reinit-text`` starts those from scratch and the rest from the export: the 12,220-step
    export never learnt to bind object names (its loss with another object's caption was within 0.1-0.6% of its
    own on training clips, on one-frame clips too), while a new text path on the same network learns it.
    """
    return "text_embedder" in name or ".attn2." in name or ".norm2." in name


def flow_batch(data: dict, batch: int, dropout: float, generator: torch.Generator, empty_text=None):
    """A rectified-flow batch: ``x_t = (1 - s) x0 + s noise``, target ``noise - x0``, s logit-normal.

    Returns ``(x_t, timestep, text, target)``; the timestep is ``1000 s``, as Wan's flow schedulers number them.
    ``empty_text`` stands in for ``data["empty_text"]`` where ``data`` has none. Everything is drawn on the
    generator's device, where ``data`` must be.
    """
    device = generator.device
    index = torch.randint(len(data["latents"]), (batch,), generator=generator, device=device)
    x0 = data["latents"][index].float()
    text = data["text"][index].float()
    drop = torch.rand(batch, generator=generator, device=device) < dropout  # classifier-free guidance: empty prompt
    text[drop] = (data["empty_text"] if empty_text is None else empty_text).float()
    sigma = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    noise = torch.randn(x0.shape, generator=generator, device=device)
    s = sigma.view(-1, 1, 1, 1, 1)
    return (1 - s) * x0 + s * noise, sigma * 1000, text, noise - x0


def flow_loss(model, x_t, timestep, text, target, precision: str = "fp32") -> torch.Tensor:
    """Mean squared error of the predicted velocity, the forward under bf16 autocast when asked."""
    device_type = x_t.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        prediction = model(hidden_states=x_t, timestep=timestep, encoder_hidden_states=text).sample
    return F.mse_loss(prediction.float(), target)


def _dit_state(args: argparse.Namespace):
    """The transformer, its EMA weights, optimiser, generator, checkpoint path, step, losses (``[step, loss]`` every
    100 steps) and the step its optimiser started at: resumed when a checkpoint exists, else (a new session) loaded
    from the transformer exported under ``--init`` (without its caption path under ``--reinit-text``) with a fresh
    optimiser, else new."""
    model = new_transformer().to(args.device).train()
    logger.info("transformer: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator(args.device).manual_seed(args.seed)
    path, step, losses, start = args.work / "dit.safetensors", 0, [], 0
    if path.exists():
        tensors, meta = load_checkpoint(path)
        model.load_state_dict(model_weights(tensors))
        ema = {k[4:]: v.to(args.device) for k, v in tensors.items() if k.startswith("ema.")}
        _restore_optimizer(optimizer, {k: v.to(args.device) for k, v in tensors.items()}, meta["optimizer"])
        try:
            generator.set_state(tensors["generator"])
        except RuntimeError:  # a checkpoint written on another kind of device: its draws cannot continue here
            logger.warning("dit: the checkpoint's generator is another device's; drawing afresh from --seed")
        step, losses, start = meta["step"], meta["losses"], meta.get("optimizer_start", 0)
    elif args.init is not None:  # no checkpoint here (a new session): start from an exported transformer
        exported = load_file(args.init / "transformer" / "diffusion_pytorch_model.safetensors")
        exported = {k: v.float() for k, v in exported.items()}
        if args.reinit_text:  # keep this model's fresh text path: the caption embedder, cross-attention and its norm
            exported = {k: v for k, v in exported.items() if not is_text_path(k)}
        model.load_state_dict({**model.state_dict(), **exported})
        ema = {name: p.detach().clone() for name, p in model.named_parameters()}
        summary = args.init / "training.json"
        summary = json.loads(summary.read_text()) if summary.exists() else {}
        step, losses = summary.get("dit_steps", 0), summary.get("loss_per_100_steps", [])
        start = step
        logger.info("dit: no checkpoint; starting from %s (step %d; fresh optimiser state)", args.init, step)
    return model, ema, optimizer, generator, path, step, losses, start


def train_dit(args: argparse.Namespace) -> None:
    """Train the transformer with rectified flow, EMA and caption dropout; checkpoint every few minutes."""
    torch.manual_seed(args.seed)
    if args.reinit_text and args.init is None and not (args.work / "dit.safetensors").exists():
        raise ValueError("--reinit-text starts the caption path afresh on an export: give --init (or resume its run)")
    data = load_file(stage_output(args, "encoded.safetensors", "encode"), device=args.device)
    frames = None
    if args.frame_batch and (args.work / "frames.safetensors").is_file():
        frames = load_file(args.work / "frames.safetensors", device=args.device)
    elif args.frame_batch:  # the causal VAE encodes a clip's first frame alone: its first latent frame is one
        frames = {"latents": data["latents"][:, :, :1], "text": data["text"]}
        logger.info("dit: one-frame clips from the first latent frames of the %d clips", len(data["latents"]))
    model, ema, optimizer, generator, path, step, losses, start = _dit_state(args)
    # the lr warms up over --warmup steps of this optimiser's life (again after a start from an export) and, with
    # --decay-steps, then falls linearly to zero at that many steps after the optimiser's start, where training
    # ends; the checkpoint records the start, so a resume continues both
    end = start + args.decay_steps if args.decay_steps else args.max_steps
    began, deadline, last_save, window = time.time(), time.time() + 60 * args.minutes, time.time(), []
    bar = tqdm(desc="dit", initial=step, mininterval=30)
    while time.time() < deadline and step < min(end, args.max_steps):
        x_t, timestep, text, target = flow_batch(data, args.batch, args.caption_dropout, generator)
        decay = (end - step) / args.decay_steps if args.decay_steps else 1.0
        if args.decay_at_deadline:
            decay = min(decay, max(0.0, (deadline - time.time()) / (deadline - began)))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step - start + 1) / args.warmup, decay)
        loss = flow_loss(model, x_t, timestep, text, target, precision=args.precision)
        if frames is not None:  # joint image-video training: one-frame clips in a second forward
            still = flow_batch(frames, args.frame_batch, args.caption_dropout, generator, data["empty_text"])
            loss = loss + flow_loss(model, *still, precision=args.precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        # a new text path starts random: the EMA warms up again from the optimiser's start, or it would hold the init
        _ema_update(ema, model, step - start if args.reinit_text else step, args.ema_decay)
        step += 1
        window.append(loss.detach())  # read every 100 steps: a read per step would stall a GPU
        bar.update()
        if step % 100 == 0:
            losses.append([step, torch.stack(window).mean().item()])
            logger.info("dit step %d: loss %.4f", step, losses[-1][1])
            window = []
        if time.time() - last_save > 60 * args.save_minutes:
            _save_dit(path, model, ema, optimizer, generator, step, losses, start)
            last_save = time.time()
    _save_dit(path, model, ema, optimizer, generator, step, losses, start)
    logger.info("dit: %d steps; loss per 100 steps: %s", step, losses[-5:])


def _save_dit(path: Path, model, ema, optimizer, generator, step: int, losses: list, start: int) -> None:
    opt_tensors, opt_meta = _flat_optimizer(optimizer)
    tensors = {f"model.{k}": v.cpu() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.cpu() for k, v in ema.items()})
    tensors.update({k: v.cpu() for k, v in opt_tensors.items()})
    meta = {"step": step, "optimizer": opt_meta, "losses": losses, "optimizer_start": start}
    save_checkpoint(path, {**tensors, "generator": generator.get_state()}, meta)
    logger.info("dit checkpoint at step %d", step)


# -- export and samples --------------------------------------------------------------------------------------


def export(args: argparse.Namespace) -> None:
    """Write the diffusers folder: EMA transformer and VAE in fp16, the scheduler, and a training summary.

    The text encoder and tokenizer are not copied: they are the image model's (``pipelines/default_model``),
    and :func:`accel.pipelines.video.load_default_video_pipeline` passes them in.
    """
    from diffusers import UniPCMultistepScheduler

    statistics = latent_statistics(args)
    tensors, meta = load_checkpoint(args.work / "dit.safetensors")
    transformer = new_transformer()
    weights = model_weights(tensors)
    weights.update({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    transformer.load_state_dict(weights)
    vae = load_vae(args.work, init=args.init)
    vae.register_to_config(**statistics)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT, num_train_timesteps=1000
    )
    out = Path(args.out)
    for name in ("transformer", "vae", "scheduler"):
        shutil.rmtree(out / name, ignore_errors=True)
    transformer.to(torch.float16).save_pretrained(out / "transformer")
    vae.to(torch.float16).save_pretrained(out / "vae")
    strip_load_paths(out)  # a VAE loaded from --init names its folder
    scheduler.save_pretrained(out / "scheduler")
    _write_model_index(out)
    summary = {"dit_steps": meta["step"], "loss_per_100_steps": meta["losses"], "dit_config": DIT_CONFIG}
    summary.update(vae_config=VAE_CONFIG, text_length=TEXT_LENGTH, frames=FRAMES, size=SIZE)
    if args.objects is not None:  # trained on these train objects only (encode --objects)
        summary["objects"] = json.loads(Path(args.objects).read_text())
    (out / "training.json").write_text(json.dumps(summary, indent=1))
    logger.info("exported step %d to %s", meta["step"], out)


def _write_model_index(out: Path) -> None:
    from diffusers import __version__

    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": __version__,
        "boundary_ratio": None,
        "expand_timesteps": False,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "BertModel"],  # not stored here: pipelines/default_model/text_encoder
        "tokenizer": ["transformers", "BertTokenizerFast"],  # not stored here: pipelines/default_model/tokenizer
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def sample(args: argparse.Namespace) -> None:
    """Generate held-out object/motion pairs with the exported pipeline; save a strip PNG (one clip a row)."""
    from accel.pipelines.video import DEFAULT_VIDEO_CALL_KWARGS, load_default_video_pipeline

    _, names, split = load_emoji()
    heldout = split_pairs(object_split(split, names, args.objects))["heldout"]
    picks = [heldout[i] for i in np.random.default_rng(args.seed).choice(len(heldout), args.samples, replace=False)]
    prompts = [caption(names[index], motion) for index, motion in picks]
    pipe = load_default_video_pipeline(args.out, device=args.device)
    generator = torch.Generator().manual_seed(args.seed)
    kwargs = {**DEFAULT_VIDEO_CALL_KWARGS, "num_inference_steps": args.sample_steps}
    frames = pipe(prompts, generator=generator, **kwargs).frames  # (B, T, H, W, 3) in [0, 1]
    path = args.work / f"samples_{json.loads((Path(args.out) / 'training.json').read_text())['dit_steps']}.png"
    save_strip(path, list(frames))
    logger.info("wrote %s for prompts %s", path, prompts)


def save_strip(path: Path, clips: list) -> None:
    """Write ``clips`` (each ``(T, H, W, 3)`` in [0, 1], numpy or torch) as a PNG: one clip a row, 9 evenly spaced
    frames."""
    from PIL import Image

    shown = np.linspace(0, len(clips[0]) - 1, 9).round().astype(int)
    rows = [np.concatenate([np.asarray(clip[i]) for i in shown], axis=1) for clip in clips]  # (H, 9 W, 3) each
    Image.fromarray((np.concatenate(rows) * 255).round().astype(np.uint8)).save(path)


@torch.no_grad()
def roundtrip(args: argparse.Namespace) -> None:
    """Pass ``--samples`` rendered held-out clips through the VAE exported in ``--out`` (encode, decode); write a
    strip PNG (each rendered clip above its decoded one) and log each clip's PSNR and the mean colour of its ink
    (pixels the rendered frame does not leave white), rendered against decoded: what the VAE alone loses."""
    from diffusers import AutoencoderKLWan

    from accel.eval.metrics import psnr

    images, names, split = load_emoji()
    specs = clip_specs(object_split(split, names, args.objects), "heldout", 1, seed=args.seed)
    if not 1 <= args.samples <= len(specs):
        raise ValueError(f"--samples must be in 1..{len(specs)} (held-out pairs of these objects), got {args.samples}")
    specs = [specs[i] for i in np.random.default_rng(args.seed).choice(len(specs), args.samples, replace=False)]
    vae = AutoencoderKLWan.from_pretrained(Path(args.out) / "vae", torch_dtype=torch.float32).eval()
    clips = render_batch(images, specs)  # (B, 3, T, H, W) in [-1, 1]
    decoded = torch.cat([vae.decode(vae.encode(clip[None]).latent_dist.mode()).sample for clip in clips])
    clips, decoded = [(x.clamp(-1, 1) + 1).div(2).permute(0, 2, 3, 4, 1) for x in (clips, decoded)]  # (B, T, H, W, 3)
    scores, errors = psnr(decoded, clips), []
    for spec, clip, out, db in zip(specs, clips, decoded, scores):
        ink = (clip < 0.9).any(-1)  # (T, H, W)
        colours = [(x[ink].mean(0) * 255).round().int().tolist() for x in (clip, out)]
        errors.append(np.abs(np.subtract(*colours)).mean())
        logger.info("%s: PSNR %.1f dB; ink colour %s -> %s", caption(names[spec.index], spec.motion), db, *colours)
    logger.info("mean of %d clips: PSNR %.2f dB, ink colour off by %.1f levels of 255", len(specs), scores.mean(),
                np.mean(errors))  # fmt: skip
    path = args.work / "roundtrip.png"
    save_strip(path, [x.numpy() for pair in zip(clips, decoded) for x in pair])  # each rendered clip above its decoded
    logger.info("wrote %s", path)


@torch.no_grad()
def caption_gap(model, data: dict, objects: list[int], motions: list[str], count: int = 128, seed: int = 0) -> dict:
    """How much ``model`` uses the object's name: its flow loss on ``count`` cached rows of ``data`` (``latents``,
    ``text``) with each row's own caption and with the caption of a row of another object and the same motion, at
    the same noise and noise level. ``gap`` is ``other / own - 1`` in percent: 0 for a model that ignores the
    name (each row's object and motion are ``objects[i]`` and ``motions[i]``)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(objects), generator=generator)[:count].tolist()
    chosen, partners = [], []
    for row in rows:
        same_motion = [j for j in range(len(objects)) if motions[j] == motions[row] and objects[j] != objects[row]]
        if same_motion:
            chosen.append(row)
            partners.append(same_motion[int(torch.randint(len(same_motion), (1,), generator=generator))])
    if not chosen:
        raise ValueError("no row has another object with the same motion: cache more objects")
    x0 = data["latents"][chosen].float()
    sigma = torch.sigmoid(torch.randn(len(chosen), generator=generator))
    noise = torch.randn(x0.shape, generator=generator)
    s = sigma.view(-1, 1, 1, 1, 1)
    x_t, target, losses = (1 - s) * x0 + s * noise, noise - x0, {}
    for name, index in (("own", chosen), ("other", partners)):
        text = data["text"][index].float()
        total = 0.0
        for start in range(0, len(chosen), 16):
            part = slice(start, start + 16)
            loss = flow_loss(model, x_t[part], 1000 * sigma[part], text[part], target[part])
            total += loss.item() * target[part].numel()
        losses[name] = total / target.numel()
    return {**losses, "gap": 100 * (losses["other"] / losses["own"] - 1), "rows": len(chosen)}


def gap(args: argparse.Namespace) -> None:
    """Print :func:`caption_gap` of the transformer exported in ``--out`` on the cached clips (and one-frame clips,
    when cached) of ``--work``; ``--objects`` and ``--clips-per-object`` must be those the caches were made with."""
    from diffusers import WanTransformer3DModel

    _, names, split = load_emoji()
    split = object_split(split, names, args.objects)
    model = WanTransformer3DModel.from_pretrained(Path(args.out) / "transformer", torch_dtype=torch.float32).eval()
    caches = {"clips": ("encoded.safetensors", clip_specs(split, "train", args.clips_per_object, seed=args.seed))}
    if (args.work / "frames.safetensors").is_file():
        caches["one-frame clips"] = ("frames.safetensors", [ClipSpec(i, m, 0) for i, m in split_pairs(split)["train"]])
    for name, (file, specs) in caches.items():
        data = load_file(stage_output(args, file, "encode" if name == "clips" else "frames"))
        if len(data["latents"]) != len(specs):
            raise ValueError(
                f"{file} holds {len(data['latents'])} rows, these options give {len(specs)}: pass the --objects and "
                "--clips-per-object it was made with"
            )
        result = caption_gap(model, data, [s.index for s in specs], [s.motion for s in specs], seed=args.seed)
        logger.info("%s: own caption %.4f, another object's %.4f: gap %.2f%% (%d rows)", name, result["own"],
                    result["other"], result["gap"], result["rows"])  # fmt: skip
