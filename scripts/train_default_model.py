"""Train the bundled default model: a small text-to-image PixArt on the rendered emoji set, on a CPU.

Stages, each resumable from its checkpoints under ``--work`` (default ``runs/default_model``):

    python scripts/train_default_model.py vae --minutes 10      # AutoencoderKL 64x64x3 <-> 16x16x4
    python scripts/train_default_model.py encode                # cache latents and MiniLM caption states
    python scripts/train_default_model.py dit --minutes 60      # rectified-flow PixArt transformer, EMA
    python scripts/train_default_model.py export                # diffusers folder at pipelines/default_model

``dit`` and ``vae`` continue from their last checkpoint when run again (model, EMA, optimiser, step and RNG
state), so a run may span sessions. Everything is seeded.
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
from safetensors.torch import load_file, save_file
from tqdm import tqdm

logger = logging.getLogger("train_default_model")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "emoji" / "emoji64.npz"
TEXT_LENGTH = 32  # tokens; captions are short, padding is masked

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    mid_block_add_attention=False,
)

DIT_CONFIG = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=12,
    num_attention_heads=6,
    attention_head_dim=32,
    cross_attention_dim=192,
    caption_channels=384,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    use_additional_conditions=False,
)


def load_images(split: str | None = "train") -> tuple[torch.Tensor, list[str]]:
    """Dataset images as float ``(N, 3, 64, 64)`` in [-1, 1] and their captions."""
    data = np.load(DATA, allow_pickle=False)
    keep = np.ones(len(data["captions"]), dtype=bool) if split is None else data["split"] == split
    images = torch.from_numpy(data["images"][keep]).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, [str(c) for c in data["captions"][keep]]


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically write a safetensors checkpoint with JSON metadata."""
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata={"meta": json.dumps(meta)})
    tmp.replace(path)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    return load_file(path), meta


def model_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own weights among a checkpoint's tensors: its ``model.`` entries, without the prefix."""
    return {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}


def _flat_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_state() -> torch.Tensor:
    return torch.get_rng_state()


# -- VAE -----------------------------------------------------------------------------------------------------


def train_vae(args: argparse.Namespace) -> None:
    """Train the autoencoder with L1 + MSE reconstruction and a small KL term."""
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    images, _ = load_images(None)
    vae = AutoencoderKL(**VAE_CONFIG)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    path = args.work / "vae.safetensors"
    step = 0
    if path.exists():
        tensors, meta = load_checkpoint(path)
        vae.load_state_dict(model_weights(tensors))
        _restore_optimizer(optimizer, tensors, meta["optimizer"])
        torch.set_rng_state(tensors["rng"])
        step = meta["step"]
    deadline = time.time() + 60 * args.minutes
    bar = tqdm(desc="vae", initial=step)
    while time.time() < deadline:
        batch = images[torch.randint(len(images), (args.batch,))]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.l1_loss(recon, batch) + F.mse_loss(recon, batch)
        kl = posterior.kl().mean() / batch[0].numel()
        loss = rec + 1e-3 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.update()
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.3f}")
        if step % 200 == 0 or time.time() >= deadline:
            opt_tensors, opt_meta = _flat_optimizer(optimizer)
            model = {f"model.{k}": v for k, v in vae.state_dict().items()}
            save_checkpoint(path, {**model, **opt_tensors, "rng": _rng_state()}, {"step": step, "optimizer": opt_meta})
    logger.info("vae: %d steps, last reconstruction loss %.4f", step, rec.item())


def load_vae(work: Path, init: Path | None = None):
    """The trained autoencoder from ``work/vae.safetensors`` (else from the exported folder ``init``), in eval mode."""
    from diffusers import AutoencoderKL

    if not (work / "vae.safetensors").exists() and init is not None:
        logger.info("vae: no checkpoint in %s; using the exported one in %s", work, init)
        return AutoencoderKL.from_pretrained(init / "vae", torch_dtype=torch.float32).eval().requires_grad_(False)
    vae = AutoencoderKL(**VAE_CONFIG)
    tensors, _ = load_checkpoint(work / "vae.safetensors")
    vae.load_state_dict(model_weights(tensors))
    return vae.eval().requires_grad_(False)


# -- cached inputs -------------------------------------------------------------------------------------------


def encode(args: argparse.Namespace) -> None:
    """Cache latent means (scaled to unit variance) and MiniLM token states of every training caption."""
    from transformers import AutoModel, AutoTokenizer

    from accel.eval.minilm import minilm_model_dir

    vae = load_vae(args.work, args.init)
    images, captions = load_images("train")
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 64]).latent_dist.mean for i in range(0, len(images), 64)])
    scale = 1.0 / latents.std().item()
    folder = minilm_model_dir()
    tokenizer, encoder = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        tokens = tokenizer(
            captions + [""], padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
        )
        states = encoder(**tokens).last_hidden_state
    save_file(
        {
            "latents": (latents * scale).contiguous(),
            "text": states[:-1].contiguous(),
            "mask": tokens["attention_mask"][:-1].contiguous(),
            "empty_text": states[-1:].contiguous(),
            "empty_mask": tokens["attention_mask"][-1:].contiguous(),
        },
        args.work / "encoded.safetensors",
        metadata={"scaling_factor": str(scale)},
    )
    logger.info("encoded %d images; latent scaling factor %.4f", len(images), scale)


# -- transformer ---------------------------------------------------------------------------------------------


def _ema_update(ema: dict[str, torch.Tensor], model: torch.nn.Module, step: int, decay: float) -> None:
    rate = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for name, param in model.named_parameters():
            ema[name].mul_(rate).add_(param.detach(), alpha=1 - rate)


def _flow_batch(data: dict, batch: int, dropout: float):
    """A rectified-flow batch: x_t = (1 - t) x0 + t noise, target noise - x0, t logit-normal."""
    index = torch.randint(len(data["latents"]), (batch,))
    x0 = data["latents"][index]
    text, mask = data["text"][index].clone(), data["mask"][index].clone()
    drop = torch.rand(batch) < dropout  # classifier-free guidance: the empty prompt
    text[drop], mask[drop] = data["empty_text"], data["empty_mask"]
    t = torch.sigmoid(torch.randn(batch))
    noise = torch.randn_like(x0)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    return x_t, t * 1000, text, mask, noise - x0


def train_dit(args: argparse.Namespace) -> None:
    """Train the PixArt transformer with rectified flow, EMA and caption dropout; checkpoint every few minutes."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(args.seed)
    data = load_file(args.work / "encoded.safetensors")
    model = PixArtTransformer2DModel(**DIT_CONFIG).train()
    logger.info("transformer: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = {name: p.detach().clone() for name, p in model.named_parameters()}
    path, step, losses, warmup_start = args.work / "dit.safetensors", 0, [], 0
    if path.exists():
        tensors, meta = load_checkpoint(path)
        model.load_state_dict(model_weights(tensors))
        ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        _restore_optimizer(optimizer, tensors, meta["optimizer"])
        torch.set_rng_state(tensors["rng"])
        step, losses, warmup_start = meta["step"], meta["losses"], meta.get("warmup_start", 0)
    elif args.init is not None:  # no checkpoint here (a new session): start from the exported transformer
        exported = load_file(args.init / "transformer" / "diffusion_pytorch_model.safetensors")
        model.load_state_dict({k: v.float() for k, v in exported.items()})
        ema = {name: p.detach().clone() for name, p in model.named_parameters()}
        summary = json.loads((args.init / "training.json").read_text())
        step, losses = summary["dit_steps"], summary["loss_per_100_steps"]
        warmup_start = step
        logger.info("dit: no checkpoint; starting from %s (step %d; fresh optimiser state)", args.init, step)
    # lr warm-up over the first 500 steps of this optimiser's life (again after a start from an export; the
    # checkpoint records where it began, so a resume mid-warm-up continues it)
    deadline, last_save = time.time() + 60 * args.minutes, time.time()
    bar, window = tqdm(desc="dit", initial=step, mininterval=30), []
    while time.time() < deadline and step < args.max_steps:
        x_t, t, text, mask, target = _flow_batch(data, args.batch, args.caption_dropout)
        lr = args.lr * min(1.0, (step - warmup_start + 1) / 500)
        for group in optimizer.param_groups:
            group["lr"] = lr
        prediction = model(x_t, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t).sample
        loss = F.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        _ema_update(ema, model, step, args.ema_decay)
        step += 1
        window.append(loss.item())
        bar.update()
        if step % 100 == 0:
            losses.append([step, float(np.mean(window))])
            bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
            window = []
        if time.time() - last_save > 60 * args.save_minutes or time.time() >= deadline or step >= args.max_steps:
            _save_dit(path, model, ema, optimizer, step, losses, warmup_start)
            last_save = time.time()
    _save_dit(path, model, ema, optimizer, step, losses, warmup_start)
    logger.info("dit: %d steps; loss per 100 steps: %s", step, losses[-5:])


def _save_dit(path: Path, model, ema, optimizer, step: int, losses: list, warmup_start: int) -> None:
    opt_tensors, opt_meta = _flat_optimizer(optimizer)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.items()})
    meta = {"step": step, "optimizer": opt_meta, "losses": losses, "warmup_start": warmup_start}
    save_checkpoint(path, {**tensors, **opt_tensors, "rng": _rng_state()}, meta)


# -- export --------------------------------------------------------------------------------------------------


def strip_load_paths(folder: Path) -> None:
    """Drop ``_name_or_path`` from the component configs under ``folder``: a component loaded from ``--init``
    records where it was loaded from, a path on the training machine that means nothing in a shipped model."""
    for path in folder.glob("*/config.json"):
        config = json.loads(path.read_text())
        if config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export(args: argparse.Namespace) -> None:
    """Write the diffusers pipeline folder: EMA transformer and VAE in fp16, MiniLM text encoder in fp16."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from safetensors import safe_open
    from transformers import AutoModel, AutoTokenizer

    from accel.eval.minilm import minilm_model_dir

    tensors, meta = load_checkpoint(args.work / "dit.safetensors")
    transformer = PixArtTransformer2DModel(**DIT_CONFIG)
    weights = model_weights(tensors)
    weights.update({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    transformer.load_state_dict(weights)
    vae = load_vae(args.work, args.init)
    with safe_open(args.work / "encoded.safetensors", "pt") as f:
        vae.register_to_config(scaling_factor=float(f.metadata()["scaling_factor"]))
    folder = minilm_model_dir()
    pipe = PixArtAlphaPipeline(
        tokenizer=AutoTokenizer.from_pretrained(folder),
        text_encoder=AutoModel.from_pretrained(folder),
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"),
    )
    pipe.to(torch.float16).save_pretrained(args.out)
    strip_load_paths(Path(args.out))
    summary = {"dit_steps": meta["step"], "loss_per_100_steps": meta["losses"], "dit_config": DIT_CONFIG}
    (Path(args.out) / "training.json").write_text(json.dumps(summary, indent=1))
    logger.info("exported step %d to %s", meta["step"], args.out)


def main() -> None:
    """Parse the stage and its options, then run it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["vae", "encode", "dit", "export"])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "default_model")
    parser.add_argument("--out", type=Path, default=ROOT / "pipelines" / "default_model")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of this invocation")
    parser.add_argument("--save-minutes", type=float, default=3.0)
    parser.add_argument("--max-steps", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init", type=Path, default=None, help="without checkpoints in --work, start from this exported folder"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    {"vae": train_vae, "encode": encode, "dit": train_dit, "export": export}[args.stage](args)


if __name__ == "__main__":
    main()
