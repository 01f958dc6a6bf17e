"""Rotary position embeddings (RoPE) as Llama and ModernBERT apply them.

Each head's vector is read as two halves (x1, x2), the layout Hugging Face's rotate_half uses, and
pair i of (x1[i], x2[i]) is rotated by position * base^(-2i/H). Positions are the per-document
positions of packed rows, so the rotation restarts with every document.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Rotation(NamedTuple):
  """cos and sin of every position's angles, float32 [B, T, H/2]."""

  cos_BTh: jax.Array
  sin_BTh: jax.Array


def rotation(positions_BT, head_dim: int, base: float) -> Rotation:
  """The angles of `positions_BT` for heads of width `head_dim` (even) and rotary base `base`."""
  exponent_h = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq_h = 1.0 / (base**exponent_h)
  angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq_h
  return Rotation(jnp.cos(angles_BTh), jnp.sin(angles_BTh))


def rotate(x_BTNH, rot: Rotation):
  """x rotated by `rot` (computed in float32, returned in x's dtype)."""
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  cos, sin = rot.cos_BTh[:, :, None], rot.sin_BTh[:, :, None]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def select(local, global_rot: Rotation, local_rot: Rotation | None) -> Rotation:
  """The layer's rotation: `local_rot` where `local` (a traced bool) holds, else `global_rot`."""
  if local_rot is None or local is None:
    return global_rot
  return Rotation(*(jnp.where(local, lo, gl) for gl, lo in zip(global_rot, local_rot, strict=True)))
