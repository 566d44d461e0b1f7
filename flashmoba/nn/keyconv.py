"""Key convolution (FlashMoBA section 4): a short causal depthwise convolution on the keys.

    k'_t = k_t + SiLU( sum_{l=0}^{W-1} w_l * k_{t-l} + b )      (per channel; b optional)

applied to the keys before routing and attention, so the block centroids and the attended keys are both
the convolved ones. It mixes each key with its ``W - 1`` predecessors, which the paper credits with
clustering relevant tokens inside a block (a larger effective signal for the router).

Conventions
    * ``weight [C, W]`` is in torch's cross-correlation order: column ``W - 1 - l`` multiplies the key
      ``l`` tokens back, so ``weight[:, -1]`` weighs the current token. The convolution is exactly
      ``F.conv1d(groups=C)`` over the sequence left-padded with ``W - 1`` zeros.
    * Packed sequences (``cu_seqlens``) never see each other: before a sequence's first token the
      convolution reads zeros, or the rolling ``state`` when one is given.
    * Decoding: ``state [S, W - 1, C]`` holds the last ``W - 1`` raw keys of every sequence. It is read as
      the left context of this call and then overwritten in place with the new last ``W - 1`` keys, so
      feeding a sequence in pieces gives exactly the keys of one full pass. No gradient flows into it.
    * Initialisation (the paper does not say): weight and bias start at zero, so a fresh layer is exactly
      the identity, ``k' = k + SiLU(0) = k`` (an untrained MoBA layer routes like plain MoBA), while the
      weight gradient ``SiLU'(0) sum_t g_t k_{t-l} = 0.5 sum_t g_t k_{t-l}`` is non-zero, so it learns
      from the first step.

Backends (the names of :mod:`flashmoba.api`): "triton" runs one fused kernel for the forward and one for
the backward (the weight gradient is reduced per tile and summed once, deterministically); "reference"
is the same arithmetic in PyTorch (any device and dtype); "auto" picks Triton for CUDA tensors. The naive
per-lag loop :func:`key_conv_naive` is the oracle of the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from flashmoba._checks import check_cu_seqlens as _check_cu_seqlens, check_tensor as _check_tensor, resolve_backend as _resolve_backend
from flashmoba.nn.varlen import token_sequence_ids, uniform_cu_seqlens

__all__ = ["KeyConv", "key_conv", "key_conv_naive"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK_T = 64
_BLOCK_C = 64


# ----------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _lagged_keys(
    K, STATE, t, pos, seq, c, t_ok, c_ok, lag,
    stride_kn, stride_ss, stride_sw,
    WIDTH: tl.constexpr, HAS_STATE: tl.constexpr,
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
            mask=state_mask, other=0.0,
        ).to(tl.float32)
    return x


@triton.jit
def _preactivation(
    K, W, B, STATE, t, pos, seq, c, t_ok, c_ok,
    stride_kn, stride_ss, stride_sw,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """fp32 ``[BLOCK_T, BLOCK_C]``: ``sum_l w_l * k_{t-l} + b`` for tokens ``t``."""
    z = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for lag in tl.static_range(WIDTH):
        w = tl.load(W + c * WIDTH + (WIDTH - 1 - lag), mask=c_ok, other=0.0).to(tl.float32)
        x = _lagged_keys(K, STATE, t, pos, seq, c, t_ok, c_ok, lag, stride_kn, stride_ss, stride_sw,
                         WIDTH, HAS_STATE)
        z += w[None, :] * x
    if HAS_BIAS:
        z += tl.load(B + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def _keyconv_fwd_kernel(
    K, W, B, STATE, OUT, SEQ_IDS, CU,
    num_tokens, num_channels,
    stride_kn, stride_on, stride_ss, stride_sw,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok = t < num_tokens
    c_ok = c < num_channels
    seq = tl.load(SEQ_IDS + t, mask=t_ok, other=0)
    pos = t - tl.load(CU + seq).to(tl.int64)
    z = _preactivation(K, W, B, STATE, t, pos, seq, c, t_ok, c_ok, stride_kn, stride_ss, stride_sw,
                       WIDTH, HAS_BIAS, HAS_STATE, BLOCK_T, BLOCK_C)
    mask = t_ok[:, None] & c_ok[None, :]
    k = tl.load(K + t[:, None] * stride_kn + c[None, :], mask=mask, other=0.0).to(tl.float32)
    out = k + z * tl.sigmoid(z)
    tl.store(OUT + t[:, None] * stride_on + c[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _keyconv_bwd_kernel(
    K, W, B, STATE, DOUT, DK, DW_PARTIAL, DB_PARTIAL, SEQ_IDS, CU,
    num_tokens, num_channels,
    stride_kn, stride_don, stride_dkn, stride_ss, stride_sw,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
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
        z = _preactivation(K, W, B, STATE, t + ahead, pos + ahead, seq, c, ahead_ok, c_ok,
                           stride_kn, stride_ss, stride_sw, WIDTH, HAS_BIAS, HAS_STATE, BLOCK_T, BLOCK_C)
        sig = tl.sigmoid(z)
        dout = tl.load(DOUT + (t + ahead)[:, None] * stride_don + c[None, :],
                       mask=ahead_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        grad_z = dout * sig * (1.0 + z * (1.0 - sig))
        w = tl.load(W + c * WIDTH + (WIDTH - 1 - ahead), mask=c_ok, other=0.0).to(tl.float32)
        dk += w[None, :] * grad_z
        if ahead == 0:
            # This tile's share of the weight / bias gradients: sum_t grad_z[t] * k[t - lag].
            for lag in tl.static_range(WIDTH):
                x = _lagged_keys(K, STATE, t, pos, seq, c, t_ok, c_ok, lag, stride_kn, stride_ss,
                                 stride_sw, WIDTH, HAS_STATE)
                tl.store(DW_PARTIAL + (pid_t * WIDTH + WIDTH - 1 - lag) * num_channels + c,
                         tl.sum(grad_z * x, axis=0), mask=c_ok)
            if HAS_BIAS:
                tl.store(DB_PARTIAL + pid_t * num_channels + c, tl.sum(grad_z, axis=0), mask=c_ok)
    tl.store(DK + t[:, None] * stride_dkn + c[None, :], dk.to(DK.dtype.element_ty), mask=mask)


def _state_strides(state):
    return (state.stride(0), state.stride(1)) if state is not None else (0, 0)


def _keyconv_fwd(k, weight, bias, cu_seqlens, seq_ids, state):
    num_tokens, num_channels = k.shape
    out = torch.empty_like(k)
    grid = (triton.cdiv(num_tokens, _BLOCK_T), triton.cdiv(num_channels, _BLOCK_C))
    _keyconv_fwd_kernel[grid](
        k, weight, bias, state, out, seq_ids, cu_seqlens,
        num_tokens, num_channels,
        k.stride(0), out.stride(0), *_state_strides(state),
        WIDTH=weight.shape[1], HAS_BIAS=bias is not None, HAS_STATE=state is not None,
        BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C,
    )
    return out


def _keyconv_bwd(dout, k, weight, bias, cu_seqlens, seq_ids, state):
    num_tokens, num_channels = k.shape
    width = weight.shape[1]
    tiles = triton.cdiv(num_tokens, _BLOCK_T)
    dk = torch.empty_like(k)
    dw_partial = torch.empty(tiles, width, num_channels, dtype=torch.float32, device=k.device)
    db_partial = torch.empty(tiles, num_channels, dtype=torch.float32, device=k.device) if bias is not None else None
    _keyconv_bwd_kernel[(tiles, triton.cdiv(num_channels, _BLOCK_C))](
        k, weight, bias, state, dout, dk, dw_partial, db_partial, seq_ids, cu_seqlens,
        num_tokens, num_channels,
        k.stride(0), dout.stride(0), dk.stride(0), *_state_strides(state),
        WIDTH=width, HAS_BIAS=bias is not None, HAS_STATE=state is not None,
        BLOCK_T=_BLOCK_T, BLOCK_C=_BLOCK_C,
    )
    dw = dw_partial.sum(0).t().to(weight.dtype)  # [W, C] -> [C, W]
    db = db_partial.sum(0).to(bias.dtype) if bias is not None else None
    return dk, dw, db


class _KeyConvTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, weight, bias, cu_seqlens, seq_ids, state):
        ctx.save_for_backward(k, weight, bias, cu_seqlens, seq_ids, state)
        return _keyconv_fwd(k, weight, bias, cu_seqlens, seq_ids, state)

    @staticmethod
    def backward(ctx, dout):
        k, weight, bias, cu_seqlens, seq_ids, state = ctx.saved_tensors
        dk, dw, db = _keyconv_bwd(dout.contiguous(), k, weight, bias, cu_seqlens, seq_ids, state)
        return dk, dw, db, None, None, None


# ----------------------------------------------------------------------------------------------------
# PyTorch paths


def _keyconv_torch(k, weight, bias, cu_seqlens, seq_ids, state):
    """The convolution as ``W`` shifted multiply-adds over the sequences laid end to end, each preceded by
    its ``W - 1`` context rows (measured faster than ``F.conv1d`` on CPU for these widths)."""
    num_tokens, num_channels = k.shape
    context = weight.shape[1] - 1
    num_seqs = cu_seqlens.numel() - 1
    if state is None:
        state = k.new_zeros(num_seqs, context, num_channels)
    # Sequence s's tokens move right by (s + 1) * context slots; its context fills the gap before them.
    token_slot = torch.arange(num_tokens, device=k.device) + (seq_ids + 1) * context
    context_slot = (
        cu_seqlens[:-1].long()[:, None]
        + torch.arange(num_seqs, device=k.device)[:, None] * context
        + torch.arange(context, device=k.device)
    ).reshape(-1)
    extended = k.new_zeros(num_tokens + num_seqs * context, num_channels)
    extended = extended.index_copy(0, token_slot, k).index_copy(
        0, context_slot, state.reshape(-1, num_channels)
    )
    # Row r of `pre` is the pre-activation of extended slot r + context.
    rows = extended.shape[0] - context
    weight = weight.to(k.dtype)
    pre = sum(weight[:, j] * extended[j : j + rows] for j in range(context + 1))
    if bias is not None:
        pre = pre + bias.to(k.dtype)
    return k + F.silu(pre[token_slot - context])


def _roll_state_(state, k, cu_seqlens):
    """Overwrite ``state [S, W - 1, C]`` with the last ``W - 1`` keys of every sequence (older state rows
    fill in for sequences shorter than ``W - 1`` tokens)."""
    context = state.shape[1]
    if context == 0 or k.shape[0] == 0:
        return
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    # Local position, in this call's tokens, of the key that lands in state row j.
    source = lens[:, None] - context + torch.arange(context, device=k.device)
    from_keys = k[(cu_seqlens[:-1].long()[:, None] + source).clamp(min=0)]
    from_state = torch.gather(
        state, 1, (context + source).clamp(max=context - 1)[..., None].expand(-1, -1, state.shape[2])
    )
    state.copy_(torch.where((source >= 0)[..., None], from_keys.detach(), from_state))


# ----------------------------------------------------------------------------------------------------
# public functions


def key_conv_naive(k, weight, bias=None, cu_seqlens=None, state=None):
    """The definition, one sequence and one lag at a time (the oracle of the tests; differentiable).

    Args:
        k: ``[N, C]`` packed keys; weight: ``[C, W]``; bias: optional ``[C]``.
        cu_seqlens: ``[S + 1]`` (default: one sequence); state: optional ``[S, W - 1, C]`` left context.

    Returns:
        ``[N, C]``: ``k_t + SiLU(sum_l weight[:, W - 1 - l] * k_{t-l} + bias)``, in k's dtype.
    """
    num_tokens, num_channels = k.shape
    width = weight.shape[1]
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, num_tokens])
    bounds = [int(x) for x in cu_seqlens]
    outputs = []
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        left = state[s] if state is not None else k.new_zeros(width - 1, num_channels)
        padded = torch.cat([left.to(k.dtype), k[start:end]])
        pre = sum(weight[:, width - 1 - lag] * padded[width - 1 - lag : width - 1 - lag + end - start]
                  for lag in range(width))
        if bias is not None:
            pre = pre + bias
        outputs.append(k[start:end] + F.silu(pre))
    return torch.cat(outputs) if outputs else k.clone()


def _check_key_conv_args(k, weight, bias, cu_seqlens, state):
    _check_tensor("k", k)
    _check_tensor("weight", weight)
    if not k.is_floating_point():
        raise TypeError(f"k must be a floating-point tensor, got {k.dtype}")
    if weight.dim() != 2 or weight.shape[1] < 1:
        raise ValueError(f"weight must be [C, W] with W >= 1, got shape {tuple(weight.shape)}")
    num_channels = weight.shape[0]
    if k.dim() not in (2, 3) or k.shape[-1] != num_channels:
        raise ValueError(f"k must be [B, T, {num_channels}] or packed [N, {num_channels}], got {tuple(k.shape)}")
    if bias is not None:
        _check_tensor("bias", bias)
        if bias.shape != (num_channels,):
            raise ValueError(f"bias must be [{num_channels}], got shape {tuple(bias.shape)}")
    if cu_seqlens is not None:
        if k.dim() != 2:
            raise ValueError("cu_seqlens goes with packed k [N, C], not with a batch [B, T, C]")
        _check_cu_seqlens(cu_seqlens, k.shape[0], k.device, None)
    if state is not None:
        _check_tensor("state", state)
        num_seqs = k.shape[0] if k.dim() == 3 else (cu_seqlens.numel() - 1 if cu_seqlens is not None else 1)
        expected = (num_seqs, weight.shape[1] - 1, num_channels)
        if tuple(state.shape) != expected:
            raise ValueError(f"state must be [S, W - 1, C] = {list(expected)}, got {tuple(state.shape)}")
        if state.dtype != k.dtype or state.device != k.device:
            raise TypeError(f"state must match k's dtype and device ({k.dtype}, {k.device}), "
                            f"got ({state.dtype}, {state.device})")


def key_conv(
    k: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal depthwise key convolution with SiLU and residual (see the module docstring).

    Args:
        k: ``[B, T, C]`` batched keys, or ``[N, C]`` packed keys (with ``cu_seqlens``; without it, one sequence).
        weight: ``[C, W]`` (column ``W - 1`` weighs the current token); bias: optional ``[C]``.
        cu_seqlens: int32/int64 ``[S + 1]`` boundaries of packed sequences.
        state: optional ``[S, W - 1, C]`` (``S = B`` for batched keys), k's dtype: the keys before each
            sequence's first token; updated in place to the last ``W - 1`` keys (decoding).
        backend: "auto", "reference" (PyTorch) or "triton".

    Returns:
        the convolved keys, same shape and dtype as ``k``.
    """
    _check_key_conv_args(k, weight, bias, cu_seqlens, state)
    backend = _resolve_backend(backend, k.device)
    if backend == "triton" and k.dtype not in _TRITON_DTYPES:
        raise TypeError(f"dtype {k.dtype} is not supported by backend='triton' ({_TRITON_DTYPES})")
    flat = k.reshape(-1, k.shape[-1]) if k.dim() == 3 else k
    if cu_seqlens is None:
        num_seqs, seq_len = (k.shape[0], k.shape[1]) if k.dim() == 3 else (1, k.shape[0])
        cu_seqlens = uniform_cu_seqlens(num_seqs, seq_len, k.device)
    if flat.shape[0] == 0:
        return k.clone()
    seq_ids = token_sequence_ids(cu_seqlens, flat.shape[0])
    # A copy: the state is overwritten below, but the backward still needs this call's left context.
    context = None if state is None else state.detach().clone()
    if backend == "triton":
        out = _KeyConvTriton.apply(
            flat.contiguous(), weight.contiguous(), bias, cu_seqlens, seq_ids.to(torch.int32),
            context,
        )
    else:
        out = _keyconv_torch(flat, weight, bias, cu_seqlens, seq_ids, context)
    if state is not None:
        with torch.no_grad():
            _roll_state_(state, flat, cu_seqlens)
    return out.view_as(k)


class KeyConv(nn.Module):
    """Learnable key convolution ``k'_t = k_t + SiLU(sum_l w_l k_{t-l} + b)`` over ``num_channels`` channels.

    Args:
        num_channels: key channels C (all KV heads: ``num_kv_heads * head_dim``).
        kernel_size: W >= 1 (the paper uses 3 and 5).
        bias: learn a bias inside the SiLU.
        backend: "auto", "reference" or "triton" (see :func:`key_conv`).

    Parameters start at zero: a fresh KeyConv is exactly the identity (module docstring).
    """

    def __init__(self, num_channels: int, kernel_size: int = 3, bias: bool = False, *, backend: str = "auto"):
        super().__init__()
        for name, value in (("num_channels", num_channels), ("kernel_size", kernel_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_channels = num_channels
        self.kernel_size = kernel_size
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(num_channels, kernel_size))
        self.bias = nn.Parameter(torch.empty(num_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero weight and bias: the identity map (see the module docstring for why)."""
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def initial_state(self, num_seqs: int, *, device=None, dtype=None) -> torch.Tensor:
        """A zero decoding state ``[num_seqs, W - 1, C]`` (no keys seen yet)."""
        return torch.zeros(num_seqs, self.kernel_size - 1, self.num_channels,
                           device=device if device is not None else self.weight.device,
                           dtype=dtype if dtype is not None else self.weight.dtype)

    def forward(self, k: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                state: torch.Tensor | None = None) -> torch.Tensor:
        """``k [B, T, C]`` or packed ``[N, C]`` (+ ``cu_seqlens``) -> same shape; see :func:`key_conv`."""
        return key_conv(k, self.weight, self.bias, cu_seqlens=cu_seqlens, state=state, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"
