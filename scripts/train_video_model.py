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
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the stages: clips and captions in video_data.py, the autoencoder and the latents it caches in video_vae.py, the
# transformer, its export, samples and scores in video_dit.py
from video_data import ROOT, write_captions  # noqa: E402
from video_dit import export, gap, roundtrip, sample, train_dit  # noqa: E402
from video_vae import encode, encode_frames, train_vae  # noqa: E402


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
