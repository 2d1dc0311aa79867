"""Joint text+image attention over active image queries, for MMDiT models (SD3, FLUX) under per-token steps.

In an MMDiT block the text tokens and the image tokens attend to each other in one attention. Under per-token
step allocation the text is always computed (it is short, and every image token's context depends on it) and
the image stream carries only the active tokens, ``(rows, active, width)``. These processors compute the
queries, keys and values exactly as the model's own processor does, write the active image tokens' keys and
values into the layer's full-length cache (:class:`~accel.caching.token_attention.TokenAttention`), and attend
from the text and active image queries to the text and *every* image token: current for the active ones,
cached for the others. A step that computes every token equals the model's attention.

* SD3 (``JointAttnProcessor2_0``): image first, text last; SD3.5's image-only ``attn2`` goes through the same
  processor without text.
* FLUX (``FluxAttnProcessor``): text first. The double-stream blocks pass the text as
  ``encoder_hidden_states``; the single-stream blocks pass ``[text; active image]`` already concatenated. The
  rotary embedding arrives whole, ``(text + tokens, head_dim)`` and shared by the batch; the processor takes
  each row's positions from it (:attr:`gathers_positions`), since the block cannot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from accel.caching.token_attention import TokenAttention, split_heads

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class JointTokenAttentionBase(TokenAttention):
    """Attention of the text and active image queries over the text and every image key and value."""

    def attend_joint(self, image: Triple, text: Triple, text_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image output, text output)``, ``(rows, active, heads, head_dim)`` and ``(rows, text, heads,
        head_dim)``, after writing the active image keys and values into the layer's cache.

        Args:
            image: queries, keys and values of the active image tokens, each ``(rows, active, heads, head_dim)``.
            text: those of the text tokens, each ``(rows, text, heads, head_dim)``.
            text_first: whether the model orders the joint sequence text first (FLUX) or last (SD3).
        """
        keys, values = self.cached(image[1], image[2])
        parts = [(text[0], text[1], text[2]), (image[0], keys, values)]
        if not text_first:
            parts.reverse()
        # (rows, sequence, heads, head_dim) -> (rows, heads, sequence, head_dim) for the kernel
        query, key, value = (torch.cat(group, 1).transpose(1, 2) for group in zip(*parts))
        out = F.scaled_dot_product_attention(query, key, value).transpose(1, 2)
        count = text[0].shape[1]
        if text_first:
            return out[:, count:], out[:, :count]
        return out[:, : out.shape[1] - count], out[:, out.shape[1] - count :]


class SD3TokenAttention(JointTokenAttentionBase):
    """SD3's joint attention (``JointAttnProcessor2_0``) over the active image tokens; image-only when called
    without text (SD3.5's ``attn2``)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        """Same signature and results as ``JointAttnProcessor2_0.__call__``."""
        self.refuse_mask(attention_mask)
        image = split_heads(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v), attn.norm_q, attn.norm_k)
        if encoder_hidden_states is None:
            out = self.attend(*image).flatten(2, 3).to(image[0].dtype)
            return attn.to_out[1](attn.to_out[0](out))
        projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        text = split_heads(attn, encoder_hidden_states, projections, attn.norm_added_q, attn.norm_added_k)
        image_out, text_out = (t.flatten(2, 3).to(image[0].dtype) for t in self.attend_joint(image, text, False))
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return attn.to_out[1](attn.to_out[0](image_out)), text_out


class FluxTokenAttention(JointTokenAttentionBase):
    """FLUX's attention (``FluxAttnProcessor``) over the text and active image tokens, double- or
    single-stream; rotary positions gathered per row here."""

    #: this processor takes the rotary embedding whole and gathers each row's positions itself
    gathers_positions = True

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        """Same signature and results as ``FluxAttnProcessor.__call__``."""
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        self.refuse_mask(attention_mask)
        index = self.active.index
        *qkv, text_q, text_k, text_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        # (rows, sequence, heads * head_dim) -> (rows, sequence, heads, head_dim)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None:  # double-stream: the text comes separately
            text_q, text_k, text_v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (text_q, text_k, text_v))
            text = (attn.norm_added_q(text_q), attn.norm_added_k(text_k), text_v)
            image = (query, key, value)
        else:  # single-stream: [text; active image] in one sequence
            count = hidden_states.shape[1] - index.shape[1]
            text = tuple(t[:, :count] for t in (query, key, value))
            image = tuple(t[:, count:] for t in (query, key, value))
        if image_rotary_emb is not None:
            text, image = _flux_positions(text, image, image_rotary_emb, index)
        image_out, text_out = self.attend_joint(image, text, True)
        if encoder_hidden_states is None:
            return torch.cat([text_out, image_out], 1).flatten(2, 3).to(query.dtype)
        image_out = attn.to_out[1](attn.to_out[0](image_out.flatten(2, 3).to(query.dtype).contiguous()))
        return image_out, attn.to_add_out(text_out.flatten(2, 3).to(query.dtype).contiguous())


def _flux_positions(text: Triple, image: Triple, rotary, index: torch.Tensor) -> tuple[Triple, Triple]:
    """Rotate the text and active image queries and keys by their positions in FLUX's ``(cos, sin)``, each
    ``(text + tokens, head_dim)``; ``index: (rows, active)`` are the image tokens' positions after the text."""
    cos, sin = rotary
    count = text[0].shape[1]
    text_angles = (cos[None, :count], sin[None, :count])  # (1, text, head_dim)
    image_angles = (cos[count:][index], sin[count:][index])  # (rows, active, head_dim)
    text = (_flux_rotate(text[0], *text_angles), _flux_rotate(text[1], *text_angles), text[2])
    image = (_flux_rotate(image[0], *image_angles), _flux_rotate(image[1], *image_angles), image[2])
    return text, image


def _flux_rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX's rotary embedding (diffusers' ``apply_rotary_emb``, real, interleaved pairs) with angles per row.

    Args:
        states: ``(rows, sequence, heads, head_dim)``.
        cos, sin: ``(rows or 1, sequence, head_dim)``.
    """
    cos, sin = cos[:, :, None].to(states.device), sin[:, :, None].to(states.device)
    real, imaginary = states.reshape(*states.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imaginary, real], dim=-1).flatten(3)
    return (states.float() * cos + rotated.float() * sin).to(states.dtype)
