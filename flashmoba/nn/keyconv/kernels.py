"""Triton kernels of the key convolution and their launchers (imported only when the Triton path runs).

Both kernels tile the packed keys ``[N, C]`` into ``BLOCK_T`` tokens x ``BLOCK_C`` channels, one program a
tile, and look up each token's sequence so that the lags never cross a sequence start (they read the
rolling state there, or zeros). The forward writes ``k + SiLU(z)``; the backward recomputes ``z`` rather
than have the forward store it, and writes the key gradient plus one row of weight / bias gradient per
token tile, which the launcher sums in a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashmoba import configs

__all__ = ["key_conv_bwd", "key_conv_fwd"]


@triton.jit
def _lagged_keys(
    K,
    STATE,
    t,
    pos,
    seq,
    c,
    t_ok,
    c_ok,
    lag,
    stride_kn,
    stride_ss,
    stride_sw,
    WIDTH: tl.constexpr,
    HAS_STATE: tl.constexpr,
):
    """fp32 ``[BLOCK_T, BLOCK_C]``: the keys ``lag`` tokens before tokens ``t`` (at in-sequence positions
    ``pos``); before the sequence start, the state row (zeros without a state)."""
    inside = pos >= lag
    mask = (t_ok & inside)[:, None] & c_ok[None, :]
    x = tl.load(K + (t - lag)[:, None] * stride_kn + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_STATE:
        row = WIDTH - 1 + pos - lag
        state_mask = (t_ok & ~inside)[:, None] & c_ok[None, :]
        x += tl.load(
            STATE + seq[:, None] * stride_ss + row[:, None] * stride_sw + c[None, :],
            mask=state_mask,
            other=0.0,
        ).to(tl.float32)
    return x


@triton.jit
def _conv_preactivation(
    K,
    W,
    B,
    STATE,
    t,
    pos,
    seq,
    c,
    t_ok,
    c_ok,
    stride_kn,
    stride_ss,
    stride_sw,
    WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """fp32 ``[BLOCK_T, BLOCK_C]``: ``z = sum_l w_l * k_{t-l} + b`` for tokens ``t``."""
    z = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for lag in tl.static_range(WIDTH):
        w = tl.load(W + c * WIDTH + (WIDTH - 1 - lag), mask=c_ok, other=0.0).to(tl.float32)
        x = _lagged_keys(K, STATE, t, pos, seq, c, t_ok, c_ok, lag, stride_kn, stride_ss, stride_sw, WIDTH, HAS_STATE)
        z += w[None, :] * x
    if HAS_BIAS:
        z += tl.load(B + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def _conv_silu_residual_kernel(
    K,
    W,
    B,
    STATE,
    OUT,
    SEQ_IDS,
    CU,
    num_tokens,
    num_channels,
    stride_kn,
    stride_on,
    stride_ss,
    stride_sw,
    WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``out = k + SiLU(z)`` for one tile of tokens x channels."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok = t < num_tokens
    c_ok = c < num_channels
    seq = tl.load(SEQ_IDS + t, mask=t_ok, other=0)
    pos = t - tl.load(CU + seq).to(tl.int64)
    z = _conv_preactivation(
        K,
        W,
        B,
        STATE,
        t,
        pos,
        seq,
        c,
        t_ok,
        c_ok,
        stride_kn,
        stride_ss,
        stride_sw,
        WIDTH,
        HAS_BIAS,
        HAS_STATE,
        BLOCK_T,
        BLOCK_C,
    )
    mask = t_ok[:, None] & c_ok[None, :]
    k = tl.load(K + t[:, None] * stride_kn + c[None, :], mask=mask, other=0.0).to(tl.float32)
    out = k + z * tl.sigmoid(z)
    tl.store(OUT + t[:, None] * stride_on + c[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _conv_silu_residual_grads_kernel(
    K,
    W,
    B,
    STATE,
    DOUT,
    DK,
    DW_PARTIAL,
    DB_PARTIAL,
    SEQ_IDS,
    CU,
    num_tokens,
    num_channels,
    stride_kn,
    stride_don,
    stride_dkn,
    stride_ss,
    stride_sw,
    WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """For one tile: the key gradient, and this tile's row of the weight / bias gradient sums."""
    pid_t = tl.program_id(0)
    t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok = t < num_tokens
    c_ok = c < num_channels
    seq = tl.load(SEQ_IDS + t, mask=t_ok, other=0)
    start = tl.load(CU + seq).to(tl.int64)
    length = tl.load(CU + seq + 1).to(tl.int64) - start
    pos = t - start
    mask = t_ok[:, None] & c_ok[None, :]
    dk = tl.load(DOUT + t[:, None] * stride_don + c[None, :], mask=mask, other=0.0).to(tl.float32)
    for ahead in tl.static_range(WIDTH):
        # The output `ahead` tokens later reads this key through the weight of lag `ahead`; its
        # pre-activation is recomputed here rather than stored by the forward.
        ahead_ok = t_ok & (pos + ahead < length)
        z = _conv_preactivation(
            K,
            W,
            B,
            STATE,
            t + ahead,
            pos + ahead,
            seq,
            c,
            ahead_ok,
            c_ok,
            stride_kn,
            stride_ss,
            stride_sw,
            WIDTH,
            HAS_BIAS,
            HAS_STATE,
            BLOCK_T,
            BLOCK_C,
        )
        sig = tl.sigmoid(z)
        dout = tl.load(
            DOUT + (t + ahead)[:, None] * stride_don + c[None, :], mask=ahead_ok[:, None] & c_ok[None, :], other=0.0
        ).to(tl.float32)
        grad_z = dout * sig * (1.0 + z * (1.0 - sig))
        w = tl.load(W + c * WIDTH + (WIDTH - 1 - ahead), mask=c_ok, other=0.0).to(tl.float32)
        dk += w[None, :] * grad_z
        if ahead == 0:
            # This tile's share of the weight / bias gradients: sum_t grad_z[t] * k[t - lag].
            for lag in tl.static_range(WIDTH):
                x = _lagged_keys(
                    K, STATE, t, pos, seq, c, t_ok, c_ok, lag, stride_kn, stride_ss, stride_sw, WIDTH, HAS_STATE
                )
                tl.store(
                    DW_PARTIAL + (pid_t * WIDTH + WIDTH - 1 - lag) * num_channels + c,
                    tl.sum(grad_z * x, axis=0),
                    mask=c_ok,
                )
            if HAS_BIAS:
                tl.store(DB_PARTIAL + pid_t * num_channels + c, tl.sum(grad_z, axis=0), mask=c_ok)
    tl.store(DK + t[:, None] * stride_dkn + c[None, :], dk.to(DK.dtype.element_ty), mask=mask)


def _state_strides(state):
    return (state.stride(0), state.stride(1)) if state is not None else (0, 0)


def key_conv_fwd(k, weight, bias, cu_seqlens, seq_ids, state):
    """``k [N, C]`` (contiguous) -> ``k + SiLU(conv(k) + bias)``, ``[N, C]`` in k's dtype.

    ``weight [C, W]`` contiguous, ``bias [C]`` or None, ``cu_seqlens [S + 1]``, ``seq_ids`` int32 ``[N]``
    (each token's sequence), ``state [S, W - 1, C]`` or None (the left context, read only).
    """
    num_tokens, num_channels = k.shape
    BLOCK_T, BLOCK_C = configs.key_conv(num_channels, k.device)
    out = torch.empty_like(k)
    grid = (triton.cdiv(num_tokens, BLOCK_T), triton.cdiv(num_channels, BLOCK_C))
    _conv_silu_residual_kernel[grid](
        k,
        weight,
        bias,
        state,
        out,
        seq_ids,
        cu_seqlens,
        num_tokens,
        num_channels,
        k.stride(0),
        out.stride(0),
        *_state_strides(state),
        WIDTH=weight.shape[1],
        HAS_BIAS=bias is not None,
        HAS_STATE=state is not None,
        BLOCK_T=BLOCK_T,
        BLOCK_C=BLOCK_C,
    )
    return out


def key_conv_bwd(dout, k, weight, bias, cu_seqlens, seq_ids, state):
    """Gradients ``(dk [N, C], dweight [C, W], dbias [C] or None)`` for the upstream ``dout [N, C]``
    (contiguous); the other arguments as in ``key_conv_fwd``. No gradient flows into the state."""
    num_tokens, num_channels = k.shape
    width = weight.shape[1]
    BLOCK_T, BLOCK_C = configs.key_conv(num_channels, k.device)
    tiles = triton.cdiv(num_tokens, BLOCK_T)
    dk = torch.empty_like(k)
    dw_partial = torch.empty(tiles, width, num_channels, dtype=torch.float32, device=k.device)
    db_partial = torch.empty(tiles, num_channels, dtype=torch.float32, device=k.device) if bias is not None else None
    _conv_silu_residual_grads_kernel[(tiles, triton.cdiv(num_channels, BLOCK_C))](
        k,
        weight,
        bias,
        state,
        dout,
        dk,
        dw_partial,
        db_partial,
        seq_ids,
        cu_seqlens,
        num_tokens,
        num_channels,
        k.stride(0),
        dout.stride(0),
        dk.stride(0),
        *_state_strides(state),
        WIDTH=width,
        HAS_BIAS=bias is not None,
        HAS_STATE=state is not None,
        BLOCK_T=BLOCK_T,
        BLOCK_C=BLOCK_C,
    )
    dw = dw_partial.sum(0).t().to(weight.dtype)  # [W, C] -> [C, W]
    db = db_partial.sum(0).to(bias.dtype) if bias is not None else None
    return dk, dw, db
