"""Row accumulation into float32 buffers shared by many programs (the output and dQ merges).

``tl.atomic_add`` on a float32 tile issues one scalar atomic per element; on Hopper one
``red.global.add.v4.f32`` adds four contiguous floats, a quarter of the instructions and of the L2 atomic
transactions, which dominate the merge (measured: doubling the dQ atomics of the backward cost more than
all of its extra matrix work). The interpreter and older GPUs take the scalar path.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_RED_V4 = tl.constexpr(
    "{ .reg .pred p; setp.ne.b32 p, $6, 0; "
    "@p red.relaxed.gpu.global.add.v4.f32 [$1], {$2, $3, $4, $5}; mov.b32 $0, 0; }"
)


def vector_atomics_supported(device: torch.device) -> bool:
    """Whether ``accumulate_rows(..., VECTOR=True)`` can run on ``device`` (Hopper or newer, compiled)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def accumulate_rows(row_ptr, row_ok, values, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    VECTOR: tl.constexpr):
    """``row_ptr[i][0:HEAD_DIM] += values[i, 0:HEAD_DIM]`` for the rows with ``row_ok``.

    Args:
        row_ptr: ``[M]`` float32 pointers to contiguous rows (16-byte aligned when VECTOR).
        row_ok: ``[M]`` bool; values: float32 ``[M, BLOCK_D]``.
    """
    if VECTOR:
        M: tl.constexpr = values.shape[0]
        # columns 4j, 4j+1, 4j+2, 4j+3 of every row as four [M, BLOCK_D // 4] tensors
        even, odd = tl.split(tl.reshape(values, [M, BLOCK_D // 4, 2, 2]))
        c0, c2 = tl.split(even)
        c1, c3 = tl.split(odd)
        quad = 4 * tl.arange(0, BLOCK_D // 4)
        addr = (row_ptr[:, None] + quad[None, :]).to(tl.int64, bitcast=True)
        ok = (row_ok[:, None] & (quad < HEAD_DIM)[None, :]).to(tl.int32)
        tl.inline_asm_elementwise(_RED_V4, "=r,l,f,f,f,f,r", [addr, c0, c1, c2, c3, ok],
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        d = tl.arange(0, BLOCK_D)
        tl.atomic_add(row_ptr[:, None] + d[None, :], values,
                      mask=row_ok[:, None] & (d < HEAD_DIM)[None, :], sem="relaxed")
