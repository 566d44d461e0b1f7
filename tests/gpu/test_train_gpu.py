"""The training fast path changes the loss curve by no more than bf16 rounding does (real GPU).

``flashmoba train``'s step by default compiles the decoder layers, runs the dense and sliding-window layers
on FlashAttention's varlen kernel, computes the loss with the fused chunked cross-entropy and steps a fused
AdamW. Each of those is a different rounding of the same function. The yardstick is the plain path (eager
layers, SDPA, full logits, the for-each AdamW) in bf16 autocast against the same path in float32: a short
run of the fast path must stay as close to the plain bf16 run, step by step, as bf16 itself stays to
float32 (times two). The batches vary in their number of documents and longest document (every third
has documents of one length, which run as a batch), so the compiled layers see new shapes after the first
step; none of them may break the graph. Skipped where no GPU exists.
"""

import pytest
import torch

from flashmoba.models import MoBAHybridConfig, MoBAHybridForCausalLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS = 10
TOKENS = 4096


def _batches() -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    batches = []
    for step in range(STEPS):
        cuts = torch.randperm(TOKENS - 1, generator=gen)[: 1 + step % 4].add(1).sort().values.tolist()
        if step % 3 == 2:  # documents of one length: the layers' batched path
            cuts = [TOKENS // 4 * i for i in range(1, 4)]
        cu = torch.tensor([0, *cuts, TOKENS], dtype=torch.int32)
        ids = torch.randint(0, 64, (1, TOKENS), generator=gen)  # 64 of the tokens: a unigram to learn
        batches.append(
            {
                "input_ids": ids.cuda(),
                "labels": ids.cuda(),
                "cu_seqlens": cu.cuda(),
                "max_seqlen": int((cu[1:] - cu[:-1]).max()),
            }
        )
    return batches


def _losses(global_attn: str, *, fast: bool, bf16: bool) -> list[float]:
    config = MoBAHybridConfig.from_preset(
        "tiny",
        hidden_size=256,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=704,
        swa_window=256,
        moba_block_size=64,
        moba_topk=4,
        max_position_embeddings=TOKENS,
        global_attn=global_attn,
        attn_backend="triton" if global_attn == "moba" else "auto",
        causal_backend="auto" if fast else "sdpa",
        loss_chunk_size=1024 if fast else 0,
    )
    torch.manual_seed(0)
    model = MoBAHybridForCausalLM(config).cuda().train()
    if fast:
        model.compile_layers()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=fast, foreach=None if fast else True)
    losses = []
    for batch in _batches():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("global_attn", ["dense", "moba"])
def test_fast_path_follows_the_plain_curve_within_bf16_noise(global_attn):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fast = _losses(global_attn, fast=True, bf16=True)
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    plain = _losses(global_attn, fast=False, bf16=True)
    exact = _losses(global_attn, fast=False, bf16=False)
    noise = max(abs(p - e) for p, e in zip(plain, exact))
    gap = max(abs(f - p) for f, p in zip(fast, plain))
    assert plain[-1] < plain[0] - 0.5, f"the run does not learn: {plain}"
    assert gap <= 2 * noise, f"fast {fast}\nplain {plain}\nfloat32 {exact}\ngap {gap:.4f} > 2 x noise {noise:.4f}"
    assert not breaks, f"graph breaks in the compiled layers: {breaks}"
