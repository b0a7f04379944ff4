"""Block-wise 8-bit and 4-bit compression of a unit's weight matrices.

A compressed layer store keeps each weight matrix (every floating tensor of two or more
dimensions outside the embeddings) as small integers plus per-block scales; norms,
biases and the embeddings stay as they are. A tensor is cut into blocks of consecutive
values in row-major order (the last block padded with zeros).

- ``int8``: one signed byte per value and one float16 absmax scale per block of
  :data:`INT8_BLOCK`: ``x ≈ scale · q``, ``q`` in -127..127.
- ``int4``: four bits per value, asymmetric: ``x ≈ scale · q + low``, ``q`` in 0..15, per
  block of :data:`INT4_BLOCK`. Each block's scale and low are themselves quantized to
  one byte each against two float16 numbers per super-block of :data:`INT4_SUPER`
  blocks (double quantization), so a value costs 4.5625 bits.

``"8bit"`` uses ``int8`` everywhere; ``"4bit"`` uses ``int4`` in the decoder layers and
``int8`` for the head, which every token reads whole (why: benchmarks/README.md,
Compressed shards). Pure torch: no kernels of its own, no dependency.

On disk a unit's compressed tensors are one flat ``uint8`` tensor (:data:`BLOB`) of its
safetensors file, next to the tensors kept as they are; the manifest records where each
one's parts (codes, scales) are in it (:func:`compress_unit`).
"""

from __future__ import annotations

import math

import torch

from . import config
from .units import EMBED, HEAD

COMPRESSIONS = config.COMPRESSED
INT8_BLOCK = 64
INT4_BLOCK = 32
INT4_SUPER = 16  # int4 blocks per super-block of float16 scale factors
PART_ALIGN = 8  # byte offsets of the parts in a unit's blob
BLOB = "__compressed__"  # a unit's compressed tensors, in its safetensors file


def scheme_for(compression: str, unit: str, tensor: torch.Tensor) -> str | None:
    """The scheme a tensor of ``unit`` is stored with under ``compression``: ``"int8"``,
    ``"int4"``, or None (kept as it is)."""
    if unit == EMBED or not tensor.is_floating_point() or tensor.dim() < 2 or tensor.numel() == 0:
        return None
    if compression == "4bit" and unit != HEAD:
        return "int4"
    return "int8"


def block_of(scheme: str) -> int:
    """Values per block of ``scheme``."""
    return INT8_BLOCK if scheme == "int8" else INT4_BLOCK


def _blocks(t: torch.Tensor, size: int) -> torch.Tensor:
    """``t`` in float32, flattened and zero-padded to ``[n, size]``."""
    flat = t.detach().reshape(-1).float()
    pad = -flat.numel() % size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, size)


def _half_up(x: torch.Tensor) -> torch.Tensor:
    """``x`` (non-negative float32) as float16, rounded up so the stored value is never
    below ``x``; zeros become one (a block of zeros then decodes to zeros).

    Raises:
        ValueError: ``x`` is beyond float16's range.
    """
    h = x.to(torch.float16)
    h = torch.where(h.float() < x, torch.nextafter(h, torch.tensor(float("inf"), dtype=torch.float16)), h)
    if not torch.isfinite(h).all():
        raise ValueError(f"its scales reach {x.max().item():.3g}, beyond float16's range")
    return torch.where(h == 0, torch.ones_like(h), h)


def quantize(t: torch.Tensor, scheme: str) -> dict[str, torch.Tensor]:
    """Compress ``t`` with ``scheme``.

    Returns:
        The stored parts by part name (``q`` and ``scale`` for ``int8``; ``q``,
        ``scale``, ``low`` and ``super`` for ``int4``).

    Raises:
        ValueError: ``t`` holds inf or nan, or values too large for float16 scales.
    """
    if not torch.isfinite(t).all():
        raise ValueError("it holds inf or nan")
    if scheme == "int8":
        x = _blocks(t, INT8_BLOCK)                                      # [n, 64]
        scale = _half_up(x.abs().amax(1) / 127)                         # [n]
        q = torch.round(x / scale.float()[:, None]).clamp(-127, 127)
        return {"q": q.to(torch.int8), "scale": scale}
    if scheme == "int4":
        x = _blocks(t, INT4_BLOCK * INT4_SUPER).view(-1, INT4_SUPER, INT4_BLOCK)  # [s, 16, 32]
        lo, hi = x.amin(2), x.amax(2)                                              # [s, 16]
        low_step = _half_up(lo.abs().amax(1) / 127 * (1 + 2**-9))                  # [s]
        low_q = torch.floor(lo / low_step.float()[:, None]).clamp(-128, 127)       # low <= the block's min
        low = low_q * low_step.float()[:, None]
        step = (hi - low) / 15
        scale_step = _half_up(step.amax(1) / 255 * (1 + 2**-9))                    # [s]
        scale_q = torch.ceil(step / scale_step.float()[:, None]).clamp(0, 255)     # scale >= the block's step
        scale = scale_q * scale_step.float()[:, None]
        q = torch.round((x - low[..., None]) / torch.where(scale == 0, 1, scale)[..., None]).clamp(0, 15)
        q = q.to(torch.uint8).view(-1, 2)
        return {"q": q[:, 0] | (q[:, 1] << 4), "scale": scale_q.to(torch.uint8), "low": low_q.to(torch.int8),
                "super": torch.stack([scale_step, low_step], 1)}
    raise ValueError(f"unknown scheme {scheme!r}")


def dequantize(parts: dict[str, torch.Tensor], scheme: str, shape, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor that ``parts`` (from :func:`quantize`) stores, in ``dtype``.

    Codes are converted straight into the output and scaled there in place (in float32
    for a half-precision ``dtype``, then rounded once).

    Args:
        parts: the stored parts by part name.
        scheme: ``"int8"`` or ``"int4"``.
        shape: the tensor's shape.
        dtype: floating dtype to decode into.
        out: a contiguous tensor of ``shape`` and ``dtype`` to write it to; default a new one.
    """
    numel = math.prod(shape)
    out = torch.empty(shape, dtype=dtype) if out is None else out
    flat = out.view(-1)
    group = INT8_BLOCK if scheme == "int8" else INT4_BLOCK * INT4_SUPER
    padded = -(-numel // group) * group
    calc = dtype if dtype.itemsize >= 4 else torch.float32  # half precision: decode in float32, then round once
    work = flat if padded == numel and calc == dtype else torch.empty(padded, dtype=calc)
    if scheme == "int8":
        work.view(-1, INT8_BLOCK).copy_(parts["q"]).mul_(parts["scale"].to(calc)[:, None])
    elif scheme == "int4":
        packed, steps = parts["q"], parts["super"].to(calc)            # [s * 256], [s, 2]
        pairs = work.view(-1, 2)                                        # value 2i: low nibble, 2i+1: high
        pairs[:, 0].copy_(packed & 15)
        pairs[:, 1].copy_(packed >> 4)
        scale = parts["scale"].to(calc) * steps[:, :1]                  # [s, 16]
        low = parts["low"].to(calc) * steps[:, 1:]                      # [s, 16]
        work.view(-1, INT4_SUPER, INT4_BLOCK).mul_(scale[..., None]).add_(low[..., None])
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    if work is not flat:
        flat.copy_(work[:numel])
    return out


def compress_unit(compression: str, unit: str, tensors: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """A unit's tensors as stored under ``compression``.

    Returns:
        ``(stored, layouts)``: the tensors to write (those kept as they are, and
        :data:`BLOB`: the parts of all compressed ones as one flat ``uint8`` tensor), and
        the layout of each compressed tensor by name: its scheme, block size and each
        part's byte offset in the blob, dtype and shape (what the manifest records).

    Raises:
        ValueError: a tensor cannot be compressed (the message names it).
    """
    stored, layouts, chunks, offset = {}, {}, [], 0
    for name, t in tensors.items():
        scheme = scheme_for(compression, unit, t)
        if scheme is None:
            stored[name] = t
            continue
        try:
            parts = quantize(t, scheme)
        except ValueError as e:
            raise ValueError(f"tensor {name} of unit {unit} cannot be compressed: {e}") from None
        lay = {"scheme": scheme, "block": block_of(scheme), "parts": {}}
        if scheme == "int4":
            lay["super_block"] = INT4_SUPER
        for part, p in parts.items():
            pad = -offset % PART_ALIGN
            chunks.append(torch.zeros(pad, dtype=torch.uint8))
            offset += pad
            lay["parts"][part] = {"offset": offset, "dtype": str(p.dtype).removeprefix("torch."),
                                  "shape": list(p.shape)}
            chunks.append(p.contiguous().view(-1).view(torch.uint8))
            offset += chunks[-1].numel()
        layouts[name] = lay
    if chunks:
        stored[BLOB] = torch.cat(chunks)
    return stored, layouts


def unpack(blob: torch.Tensor, lay: dict, numel: int, name: str) -> dict[str, torch.Tensor]:
    """The parts of compressed tensor ``name`` in ``blob``, as views of it, checked against
    a tensor of ``numel`` values under its layout ``lay``.

    Raises:
        ValueError: the blob or layout does not fit (the message names the tensor).
    """
    scheme = lay["scheme"]
    if scheme not in ("int8", "int4") or lay["block"] != block_of(scheme) or \
            (scheme == "int4" and lay.get("super_block") != INT4_SUPER):
        raise ValueError(f"tensor {name} is stored as {scheme} in blocks of {lay['block']}, which this version "
                         "does not read")
    if scheme == "int8":
        blocks = -(-numel // INT8_BLOCK)
        want = {"q": blocks * INT8_BLOCK, "scale": blocks}
    else:
        supers = -(-numel // (INT4_BLOCK * INT4_SUPER))
        want = {"q": supers * INT4_BLOCK * INT4_SUPER // 2, "scale": supers * INT4_SUPER,
                "low": supers * INT4_SUPER, "super": supers * 2}
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"tensor {name} is stored as {blob.dtype} {list(blob.shape)}, not as flat bytes")
    parts = {}
    for part, n in want.items():
        spec = lay["parts"][part]
        dtype, start = getattr(torch, spec["dtype"]), int(spec["offset"])
        if math.prod(spec["shape"]) != n or start % dtype.itemsize or start + n * dtype.itemsize > blob.numel():
            raise ValueError(f"part {part} of tensor {name} does not fit its {blob.numel()} stored bytes")
        parts[part] = blob[start:start + n * dtype.itemsize].view(dtype).view(spec["shape"])
    return parts


def expand_unit(stored: dict[str, torch.Tensor], tensors: dict[str, dict], dtype: torch.dtype | None,
                out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A unit's tensors from what :func:`compress_unit` stored.

    Args:
        stored: the shard's tensors by name.
        tensors: the manifest's ``tensors`` of the unit: each one's ``dtype`` and
            ``shape``, and ``compressed`` (its layout) when it is.
        dtype: floating dtype to decode into (default: each tensor's own).
        out: tensors to decode into, by name (default: new ones).

    Raises:
        KeyError: a stored tensor is missing.
        ValueError: a stored tensor does not fit its layout.
    """
    result = {}
    for name, info in tensors.items():
        own = getattr(torch, info["dtype"])
        want = dtype if dtype is not None and own.is_floating_point else own
        target = None if out is None else out[name]
        lay = info.get("compressed")
        if lay is None:
            t = stored[name]
            result[name] = t.to(want) if target is None else target.copy_(t.view(target.shape))
            continue
        parts = unpack(stored[BLOB], lay, math.prod(info["shape"]), name)
        result[name] = dequantize(parts, lay["scheme"], info["shape"], want, target)
    return result
