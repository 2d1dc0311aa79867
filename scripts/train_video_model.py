"""Train the bundled default video model: a small text-to-video Wan on rendered emoji clips, on a CPU or a GPU.

Stages, each resumable from its checkpoints under ``--work`` (default ``runs/video_model``):

    python scripts/train_video_model.py vae --minutes 20     # AutoencoderKLWan 17x64x64x3 <-> 9x16x16x8
    python scripts/train_video_model.py captions             # (optional) MiniLM states of every caption
    python scripts/train_video_model.py encode               # cache clip latents and MiniLM caption states
    python scripts/train_video_model.py frames               # cache 1-frame clips of every training pair
    python scripts/train_video_model.py dit --minutes 90     # rectified-flow WanTransformer3DModel, EMA
    python scripts/train_video_model.py export               # diffusers folder at pipelines/default_video_model
    python scripts/train_video_model.py sample               # a strip of frames of held-out prompts (PNG)
    python scripts/train_video_model.py roundtrip            # held-out clips through the exported VAE (PNG)

``vae`` and ``dit`` continue from their last checkpoint when run again (model, EMA, optimiser, step and the
data/noise generator), so a run may span sessions. Clips come from ``scripts/render_clips.py`` (rendered on the
fly, seeded); the text encoder is the all-MiniLM-L6-v2 copy in ``pipelines/default_model``, encoded exactly as
``WanPipeline`` does (token states, padding zeroed, no mask). ``--device cuda`` trains on a GPU.

``captions`` stores the caption states of every object/motion pair in ``--work``; ``encode`` and ``frames`` then
look captions up there instead of running the text encoder, so a machine without its weights (a lent GPU the
checkout travels to without them) can encode. ``encode --workers N`` (and ``frames``) renders clips in ``N`` processes.

``dit --frame-batch N`` trains on images and video jointly, as Wan does: each step adds the loss of ``N`` one-frame
clips (the first frame of a training pair's clip, which the causal VAE encodes alone, as it encodes a clip's first
frame: 64 tokens each) to the loss of the video batch, so object appearance is learnt at a ninth of the cost per
sample. Without the ``frames`` stage's file, the one-frame clips are the first latent frames of the encoded clips
(the same latents: the causal VAE encodes a clip's first frame alone). ``dit --decay-at-deadline`` lets the lr fall
linearly to zero at the ``--minutes`` deadline, for a run that must end inside one lease of a GPU.

``python scripts/train_video_model.py gap --out FOLDER`` prints how much an export uses the object's name
(:func:`caption_gap`). ``encode``, ``frames``, ``export``, ``sample`` and ``gap --objects objects.json`` (a JSON
list of train object names) train on, record, sample and score those objects only; each keeps its held-out motion.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from render_clips import (  # noqa: E402
    FRAMES,
    SIZE,
    ClipSpec,
    caption,
    clip_specs,
    load_emoji,
    render_clip,
    split_pairs,
    subset_split,
)
from train_default_model import (  # noqa: E402
    _ema_update,
    _flat_optimizer,
    _restore_optimizer,
    load_checkpoint,
    save_checkpoint,
    strip_load_paths,
)

logger = logging.getLogger("train_video_model")

ROOT = Path(__file__).resolve().parents[1]
TEXT_DIR = ROOT / "pipelines" / "default_model"  # tokenizer/ and text_encoder/ (all-MiniLM-L6-v2, fp16)
TEXT_LENGTH = 32  # tokens; the longest caption has 22
CAPTIONS = "captions.safetensors"  # the ``captions`` stage's table in --work
# the scheduler's sigma shift at sampling time: on 64 training-split object/motion pairs (20 steps, guidance 4,
# the 9,070-step export) FID-EffNetLite0 was 172.0 / 168.6 / 166.6 / 165.6 / 165.4 at shift 1 / 2 / 3 / 4 / 5
FLOW_SHIFT = 5.0
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


# -- data ----------------------------------------------------------------------------------------------------


def render_batch(images: np.ndarray, specs: list[ClipSpec], frames: int = FRAMES) -> torch.Tensor:
    """Clips as float ``(B, 3, frames, SIZE, SIZE)`` in [-1, 1] (the first ``frames`` of each clip's track)."""
    return as_clip_tensor(_render_uint8(images, specs, frames))


def _render_uint8(images: np.ndarray, specs: list[ClipSpec], frames: int = FRAMES) -> np.ndarray:
    return np.stack([render_clip(images[s.index], s.motion, s.seed, frames) for s in specs])  # (B, T, H, W, 3)


def as_clip_tensor(clips: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, T, H, W, 3)`` frames as float ``(B, 3, T, H, W)`` in [-1, 1]."""
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def rendered_batches(images: np.ndarray, specs: list[ClipSpec], batch: int, workers: int = 1, frames: int = FRAMES):
    """:func:`render_batch` of consecutive ``batch``-sized chunks of ``specs``, in order, rendered by ``workers``
    processes (in this one when 1)."""
    chunks = [specs[start : start + batch] for start in range(0, len(specs), batch)]
    if workers <= 1:
        yield from (render_batch(images, chunk, frames) for chunk in chunks)
        return
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    with ProcessPoolExecutor(workers) as pool:
        for clips in pool.map(partial(_render_uint8, images, frames=frames), chunks):
            yield as_clip_tensor(clips)


def encode_text(captions: list[str], device: str = "cpu") -> torch.Tensor:
    """MiniLM token states ``(N, TEXT_LENGTH, 384)`` with padding zeroed: what ``WanPipeline`` feeds the model."""
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(TEXT_DIR / "tokenizer")
    encoder = BertModel.from_pretrained(TEXT_DIR / "text_encoder", torch_dtype=torch.float32).to(device).eval()
    states = []
    with torch.no_grad():
        for start in range(0, len(captions), 256):
            tokens = tokenizer(
                captions[start : start + 256],
                padding="max_length",
                max_length=TEXT_LENGTH,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).to(device)
            hidden = encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
            states.append((hidden * tokens.attention_mask[..., None]).cpu())
    return torch.cat(states)


def write_captions(args: argparse.Namespace) -> None:
    """The ``captions`` stage: MiniLM states of the caption of every train and held-out pair (and of the empty
    prompt) of ``--objects``' split, in ``--work``/:data:`CAPTIONS`, for :func:`caption_states`."""
    _, names, split = load_emoji()
    pairs = split_pairs(object_split(split, names, args.objects))
    captions = sorted({caption(names[i], m) for part in ("train", "heldout") for i, m in pairs[part]}) + [""]
    states = encode_text(captions, args.device)
    save_file({"states": states.half().contiguous()}, args.work / CAPTIONS, metadata={"captions": json.dumps(captions)})
    logger.info("caption states of %d captions in %s", len(captions), args.work / CAPTIONS)


def caption_states(args: argparse.Namespace, captions: list[str]) -> torch.Tensor:
    """:func:`encode_text` of ``captions``, or, where ``--work`` holds the ``captions`` stage's table, those
    captions' rows of it (a ``KeyError`` naming a caption it lacks)."""
    path = args.work / CAPTIONS
    if not path.is_file():
        return encode_text(captions, args.device)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        row = {text: k for k, text in enumerate(json.loads(f.metadata()["captions"]))}
        states = f.get_tensor("states").float()
    missing = [text for text in captions if text not in row]
    if missing:
        raise KeyError(f"{path} has no states for {missing[:3]}: run the 'captions' stage again with these objects")
    return states[[row[text] for text in captions]]


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
        vae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
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
    vae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
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


def object_split(split: np.ndarray, names: list[str], objects: Path | None) -> np.ndarray:
    """``split`` restricted to the train objects of the JSON list ``objects`` (:func:`subset_split`)."""
    if objects is None:
        return split
    try:
        return subset_split(split, names, json.loads(Path(objects).read_text()))
    except ValueError as error:
        raise ValueError(f"{objects}: {error}") from None


def stage_output(args: argparse.Namespace, name: str, stage: str) -> Path:
    """``args.work / name``, which the ``stage`` stage writes; a ``FileNotFoundError`` saying to run that stage
    (with the same ``--work``) when it is missing, before any compute."""
    path = args.work / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run the {stage!r} stage first "
            f"(python scripts/train_video_model.py {stage} --work {args.work})"
        )
    return path


def latent_statistics(args: argparse.Namespace) -> dict[str, list[float]]:
    """The clip latents' per-channel ``latents_mean`` and ``latents_std``, as the ``encode`` stage stored them in
    ``encoded.safetensors``'s metadata (see :func:`stage_output` for a missing file)."""
    from safetensors import safe_open

    with safe_open(stage_output(args, "encoded.safetensors", "encode"), "pt") as f:
        metadata = f.metadata()
    return {key: json.loads(metadata[key]) for key in ("latents_mean", "latents_std")}


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
    model = new_transformer().to(args.device).train()
    logger.info("transformer: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator(args.device).manual_seed(args.seed)
    path, step, losses, start = args.work / "dit.safetensors", 0, [], 0
    if path.exists():
        tensors, meta = load_checkpoint(path)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
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
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
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


def build_parser() -> argparse.ArgumentParser:
    """The command line: a stage and its options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "stage", choices=["vae", "captions", "encode", "frames", "dit", "export", "sample", "gap", "roundtrip"]
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "video_model")
    parser.add_argument("--out", type=Path, default=ROOT / "pipelines" / "default_video_model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of this invocation")
    parser.add_argument("--save-minutes", type=float, default=3.0)
    parser.add_argument("--max-steps", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument(
        "--decay-steps",
        type=int,
        default=0,
        help="dit: lr falls linearly to 0 this many steps after the optimiser began",
    )
    parser.add_argument(
        "--decay-at-deadline", action="store_true", help="dit: lr falls linearly to 0 at the --minutes deadline"
    )
    parser.add_argument("--workers", type=int, default=1, help="encode, frames: processes rendering clips")
    parser.add_argument("--frame-batch", type=int, default=0, help="dit: one-frame clips per step (joint training)")
    parser.add_argument(
        "--reinit-text", action="store_true", help="dit --init: a new caption path (see is_text_path), the rest loaded"
    )
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16", help="dit forward autocast")
    parser.add_argument("--vae-batch", type=int, default=2)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--decoder-only", action="store_true", help="vae: fine-tune the decoder, encoder frozen")
    parser.add_argument("--clips-per-object", type=int, default=5)
    parser.add_argument(
        "--objects", type=Path, default=None, help="encode, frames, export, sample, gap, roundtrip: objects (JSON list)"
    )
    parser.add_argument("--max-clips", type=int, default=None, help="encode only the first clips (smoke tests)")
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="encode, frames, dit, export, vae --decoder-only: without checkpoints, start from this export",
    )
    return parser


#: options that must be at least 1, at least 0, and in [0, 1)
AT_LEAST_ONE = ("batch", "max_steps", "workers", "vae_batch", "clips_per_object", "samples", "sample_steps", "threads")
AT_LEAST_ZERO = ("warmup", "decay_steps", "frame_batch")
FRACTIONS = ("ema_decay", "caption_dropout")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse, before any stage runs, numbers out of range, a device torch does not know, and ``--init`` or
    ``--objects`` paths that are not there.

    Raises:
        ValueError: what was wrong and what is allowed.
    """
    for name in AT_LEAST_ONE:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in AT_LEAST_ZERO:
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in FRACTIONS:
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    for name in ("lr", "vae_lr", "minutes", "save_minutes"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.max_clips is not None and args.max_clips < 1:
        raise ValueError(f"--max-clips must be >= 1, got {args.max_clips}")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device must be a torch device such as cpu, cuda or cuda:0, got {args.device!r}") from None
    if args.init is not None and not args.init.is_dir():
        raise ValueError(f"--init {args.init} is not a folder (an export of this script)")
    if args.objects is not None and not args.objects.is_file():
        raise ValueError(f"--objects {args.objects} is not a file (a JSON list of train objects)")


def main() -> None:
    """Parse the stage and its options, check them, then run the stage."""
    parser = build_parser()
    args = parser.parse_args()
    try:
        check_arguments(args)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    stages = {
        "vae": train_vae,
        "captions": write_captions,
        "encode": encode,
        "frames": encode_frames,
        "dit": train_dit,
        "export": export,
        "sample": sample,
        "gap": gap,
        "roundtrip": roundtrip,
    }
    stages[args.stage](args)


if __name__ == "__main__":
    main()
