"""Context parallelism on the CPU: gloo process groups of 2 and 4 ranks against one process, in float64.

Every rank draws the same whole inputs from one seed, runs the context-parallel op on its shard, and
compares its rows (output, lse, dq, and the dk / dv that the backward reduce-scattered onto it) with the
single-process :func:`flashmoba.moba_attn` / :func:`flashmoba.moba_attn_varlen` of the whole inputs, to
float64 rounding. The multi-process tests share one xdist group: each spawn takes the CPU's cores.
"""

from __future__ import annotations

import json
import os
import socket
import zlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
from kernel_checks import assert_within_fa_rule

import flashmoba
from flashmoba import reference
from flashmoba.distributed import (
    context_parallel_moba_attn,
    context_parallel_moba_attn_varlen,
    shard_sequence,
    unshard_sequence,
)
from flashmoba.distributed.layout import check_length, local_positions, rank_major_order

SPAWN = pytest.mark.xdist_group("distributed")
F64 = dict(rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# process groups


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, results):
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results[rank] = fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():  # (flashmoba train ends its group itself)
            dist.destroy_process_group()


def spawn(world_size: int, fn, *args) -> dict:
    """``fn(rank, world_size, *args)`` on ``world_size`` forked gloo ranks -> ``{rank: result}``; a rank's
    exception is raised here with its traceback."""
    # fork: the ranks inherit the imported modules instead of importing torch again.
    with torch.multiprocessing.get_context("fork").Manager() as manager:
        results = manager.dict()
        torch.multiprocessing.start_processes(
            _entry, args=(world_size, _free_port(), fn, args, results), nprocs=world_size, start_method="fork"
        )
        return dict(results)


# ----------------------------------------------------------------------------------------------------
# layouts (no processes)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_layout_partitions_the_sequence(layout, world_size):
    chunks = 2 * world_size if layout == "zigzag" else world_size
    length = chunks * 5
    parts = [local_positions(length, world_size, r, layout) for r in range(world_size)]
    assert all(len(p) == length // world_size for p in parts)
    assert all(bool((p[1:] > p[:-1]).all()) for p in parts)  # increasing
    assert sorted(torch.cat(parts).tolist()) == list(range(length))
    assert torch.equal(rank_major_order(length, world_size, layout), torch.cat(parts))
    if layout == "zigzag":  # rank r: chunks r and 2W - 1 - r, the same sum of positions on every rank
        assert parts[0][:5].tolist() == list(range(5)) and parts[0][-1].item() == length - 1
        assert len({int(p.sum()) for p in parts}) == 1


@pytest.mark.parametrize("layout, length, message", [("zigzag", 6, "2 \\* world_size = 4"), ("contiguous", 7, "= 2")])
def test_layout_refuses_an_uneven_length(layout, length, message):
    with pytest.raises(ValueError, match=f"q has {length} tokens.*{message}"):
        check_length("q", length, 2, layout)


def test_the_ops_need_an_initialized_group():
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="group: torch.distributed is not initialized"):
        context_parallel_moba_attn(q, q, q, block_size=2, topk=2)
    with pytest.raises(ValueError, match="layout must be one of"):
        shard_sequence(q, 1, layout="ring")


# ----------------------------------------------------------------------------------------------------
# queries kept apart from their keys (one process): the building block of the op


def _query_subset(lens, fraction, gen):
    """A random subset of every sequence's tokens: ``(rows into the packed batch, query_cu, positions)``."""
    rows, cu, pos, start = [], [0], [], 0
    for n in lens:
        keep = torch.nonzero(torch.rand(n, generator=gen) < fraction).flatten()
        rows.append(start + keep)
        pos.append(keep)
        cu.append(cu[-1] + len(keep))
        start += n
    return torch.cat(rows), torch.tensor(cu, dtype=torch.int32), torch.cat(pos)


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64), ("triton", torch.float32)])
@pytest.mark.parametrize("causal", [True, False])
def test_queries_at_positions_are_the_rows_of_the_whole_attention(backend, dtype, causal):
    """Routing and attention of any subset of each sequence's queries at their positions, over all of its
    keys, equal the rows of moba_attn_varlen on the whole batch: the same blocks, the same outputs, dq of
    those rows and the dk / dv that those rows alone contribute (float64 reference: to rounding; Triton
    interpreter: the FlashAttention rule against float64 on the same routing)."""
    from flashmoba import api

    lens, hq, hkv, d, block_size, topk = (40, 0, 75, 9, 1), 4, 2, 16, 16, 3
    gen = torch.Generator().manual_seed(int(causal))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    q, k, v, _ = _inputs(int(causal), (sum(lens), hq, d), (sum(lens), hkv, d), dtype)
    rows, query_cu, positions = _query_subset(lens, 0.5, gen)
    dout = torch.randn(len(rows), hq, d, generator=gen, dtype=dtype)
    kw = dict(block_size=block_size, topk=topk, causal=causal)
    leaves = _leaves(q[rows], k, v)
    routing = api.route_queries(*[t.detach() for t in leaves[:2]], cu, query_cu, positions, backend=backend, **kw)
    out, lse = api.attend_queries(*leaves, cu, query_cu, positions, routing, softmax_scale=None, return_lse=True)
    out.backward(dout)
    got = dict(out=out, lse=lse, dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)

    whole = flashmoba.moba_route_varlen(q, k, cu, backend=backend, **kw).indices
    assert torch.equal(routing.indices, whole[rows])
    results = {}
    for name, low in (("exact", torch.float64), ("low", dtype)):
        full = _leaves(*(t.to(low) for t in (q, k, v)))
        o, lse = reference.attention(*full, cu, block_size, topk, causal, d**-0.5, indices=whole, compute_dtype=low)
        grad = torch.zeros_like(o)
        grad[rows] = dout.to(low)
        o.backward(grad)
        results[name] = dict(out=o[rows], lse=lse[rows], dq=full[0].grad[rows], dk=full[1].grad, dv=full[2].grad)
    if backend == "reference":
        for name in got:
            torch.testing.assert_close(got[name], results["exact"][name].to(got[name].dtype), **F64, msg=name)
    else:
        assert_within_fa_rule(got, results["exact"], results["low"], q[rows], k, v, dout)


# ----------------------------------------------------------------------------------------------------
# the op against one process


def _inputs(seed, shape_q, shape_kv, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=gen, dtype=dtype) for s in (shape_q, shape_kv, shape_kv))
    return q, k, v, torch.randn(*shape_q, generator=gen, dtype=dtype)


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _compare(local: dict, full: dict, dim: int, layout: str) -> dict:
    return {
        name: (local[name].detach() - shard_sequence(full[name].detach(), dim, layout=layout)).abs().max().item()
        for name in full
    }


def _run_batched(rank, world_size, case) -> dict:
    batch, per_chunk, hq, hkv, d, block_size, topk, causal, layout = case
    length = per_chunk * (2 * world_size if layout == "zigzag" else world_size)
    q, k, v, dout = _inputs(zlib.crc32(repr(case).encode()), (batch, length, hq, d), (batch, length, hkv, d))
    kw = dict(block_size=block_size, topk=topk, causal=causal, backend="reference")
    full = _leaves(q, k, v)
    out, lse = flashmoba.moba_attn(*full, return_lse=True, **kw)
    out.backward(dout)
    want = dict(out=out, lse=lse, dq=full[0].grad, dk=full[1].grad, dv=full[2].grad)

    local = _leaves(*(shard_sequence(t, 1, layout=layout) for t in (q, k, v)))
    out_l, lse_l = context_parallel_moba_attn(*local, return_lse=True, layout=layout, **kw)
    out_l.backward(shard_sequence(dout, 1, layout=layout))
    got = dict(out=out_l, lse=lse_l, dq=local[0].grad, dk=local[1].grad, dv=local[2].grad)
    errors = _compare(got, want, 1, layout)
    errors["unshard"] = (unshard_sequence(out_l, 1, layout=layout) - out).abs().max().item()
    return errors


#        batch  per_chunk  hq hkv  d  block topk causal  layout
BATCHED = [
    (2, 7, 4, 2, 8, 4, 3, True, "zigzag"),  # GQA, chunks of 7: blocks straddle ranks
    (1, 5, 2, 2, 8, 3, 2, False, "zigzag"),
    (2, 9, 4, 1, 8, 4, 3, False, "contiguous"),  # MQA, non-causal
    (1, 6, 2, 1, 4, 4, 2, True, "contiguous"),
    (1, 4, 2, 2, 8, 1, 3, True, "zigzag"),  # one-token blocks
    (1, 3, 2, 1, 8, 64, 2, True, "zigzag"),  # one block longer than the sequence
    (1, 4, 2, 2, 8, 2, 99, True, "zigzag"),  # topk beyond every block: dense causal attention
]


def _run_varlen(rank, world_size, case) -> dict:
    lens, hq, hkv, d, block_size, topk, causal, layout = case
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    total = int(cu[-1])
    q, k, v, dout = _inputs(zlib.crc32(repr(case).encode()), (total, hq, d), (total, hkv, d))
    kw = dict(block_size=block_size, topk=topk, causal=causal, backend="reference")
    full = _leaves(q, k, v)
    out, lse = flashmoba.moba_attn_varlen(*full, cu, return_lse=True, **kw)
    out.backward(dout)
    want = dict(out=out, lse=lse, dq=full[0].grad, dk=full[1].grad, dv=full[2].grad)

    local = _leaves(*(shard_sequence(t, 0, layout=layout) for t in (q, k, v)))
    out_l, lse_l = context_parallel_moba_attn_varlen(*local, cu, return_lse=True, layout=layout, **kw)
    # The loss through unshard_sequence, the same on every rank: its backward keeps the local slice.
    (unshard_sequence(out_l, 0, layout=layout) * dout).sum().backward()
    got = dict(out=out_l, lse=lse_l, dq=local[0].grad, dk=local[1].grad, dv=local[2].grad)
    return _compare(got, want, 0, layout)


def _varlen_cases(world_size):
    """Packed documents whose boundaries fall anywhere: empty ones, one-token ones, some across ranks."""
    total = 2 * world_size * 11
    first = [0, 3, 1, 19]
    rest = total - sum(first) - 5
    return [
        (tuple(first + [rest, 0, 5]), 4, 2, 8, 4, 3, True, "zigzag"),  # GQA
        (tuple(first + [rest, 0, 5]), 2, 1, 8, 4, 2, False, "zigzag"),
        ((total - 2 * world_size - 7, 7, 2 * world_size), 2, 2, 8, 5, 3, True, "contiguous"),
        ((total,), 2, 1, 4, 3, 4, True, "contiguous"),
    ]


def _run_all(rank, world_size) -> dict:
    results = {}
    for case in BATCHED:
        results[("batched", case)] = _run_batched(rank, world_size, case)
    for case in _varlen_cases(world_size):
        results[("varlen", case)] = _run_varlen(rank, world_size, case)
    return results


@SPAWN
@pytest.mark.parametrize("world_size", [2, 4])
def test_context_parallel_equals_one_process(world_size):
    """Forward (out, lse) and gradients (dq; dk, dv reduce-scattered to their owners) of every rank's rows
    equal the single-process result: GQA/MQA, causal and not, both layouts, blocks across ranks, packed
    documents of uneven lengths (empty, one token, straddling rank boundaries)."""
    results = spawn(world_size, _run_all)
    for rank, cases in results.items():
        for (kind, case), errors in cases.items():
            for name, error in errors.items():
                assert error <= 1e-12, f"rank {rank} {kind} {case}: {name} differs by {error:.3g}"


def _run_errors(rank, world_size) -> list[str]:
    q = torch.randn(1, 3, 2, 8, dtype=torch.float64)  # T = 2 * 3 = 6 tokens: not divisible by 2W = 4
    messages = []
    for call in (
        lambda: context_parallel_moba_attn(q, q, q, block_size=2, topk=2),
        lambda: context_parallel_moba_attn_varlen(q[0], q[0], q[0], torch.tensor([0, 6], dtype=torch.int32)),
        lambda: shard_sequence(torch.zeros(2, 6), 1),
        lambda: context_parallel_moba_attn_varlen(
            q[0], q[0], q[0], torch.tensor([0, 5], dtype=torch.int32), layout="contiguous"
        ),
    ):
        with pytest.raises(ValueError) as info:
            call()
        messages.append(str(info.value))
    return messages


@SPAWN
def test_uneven_lengths_are_refused_naming_the_argument():
    messages = spawn(2, _run_errors)[0]
    assert "q (T = world_size * q.shape[1]) has 6 tokens" in messages[0] and "2 * world_size = 4" in messages[0]
    assert "q (N = world_size * q.shape[0]) has 6 tokens" in messages[1]
    assert "x.shape[1] has 6 tokens" in messages[2]
    assert "cu_seqlens must end at the number of tokens N=6" in messages[3]


# ----------------------------------------------------------------------------------------------------
# the Triton kernels (interpreter, float32)


def _run_triton(rank, world_size) -> dict:
    lens, hq, hkv, d, block_size, topk = (9, 0, 47, 24), 4, 2, 16, 16, 3
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    q, k, v, dout = _inputs(7, (80, hq, d), (80, hkv, d), torch.float32)
    results = {}
    for causal in (True, False):
        kw = dict(block_size=block_size, topk=topk, causal=causal)
        local = _leaves(*(shard_sequence(t, 0) for t in (q, k, v)))
        out_l, lse_l = context_parallel_moba_attn_varlen(*local, cu, return_lse=True, backend="triton", **kw)
        out_l.backward(shard_sequence(dout, 0))
        grads = [unshard_sequence(t.grad, 0) for t in local]
        results[causal] = [unshard_sequence(t.detach(), 0) for t in (out_l, lse_l)] + grads
    return results


@SPAWN
def test_triton_kernels_under_context_parallelism():
    """The engine's kernels with queries at key rows (2 ranks, Triton interpreter): out, lse and the
    gradients pass the FlashAttention rule (at most 2x the error of PyTorch in float32) against float64 on
    the single-process Triton routing, which a different routing would fail."""
    results = spawn(2, _run_triton)
    lens, hq, hkv, d, block_size, topk = (9, 0, 47, 24), 4, 2, 16, 16, 3
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
    q, k, v, dout = _inputs(7, (80, hq, d), (80, hkv, d), torch.float32)
    for causal in (True, False):
        kernel = results[0][causal]
        assert all(torch.equal(a, b) for a, b in zip(kernel, results[1][causal], strict=True))  # all-gathered
        routing = flashmoba.moba_route_varlen(
            q, k, cu, block_size=block_size, topk=topk, causal=causal, backend="triton"
        )
        exact, low = {}, {}
        for store, dtype in ((exact, torch.float64), (low, torch.float32)):
            leaves = _leaves(*(t.to(dtype) for t in (q, k, v)))
            o, lse = reference.attention(
                *leaves, cu, block_size, topk, causal, d**-0.5, indices=routing.indices, compute_dtype=dtype
            )
            o.backward(dout.to(dtype))
            store.update(out=o, lse=lse, dq=leaves[0].grad, dk=leaves[1].grad, dv=leaves[2].grad)
        assert_within_fa_rule(dict(zip(exact, kernel, strict=True)), exact, low, q, k, v, dout)


# ----------------------------------------------------------------------------------------------------
# training: every attention layer of the model under context parallelism

VOCAB = 64


def _micro_run(steps, global_attn, **config):
    """The hybrid model (a sliding-window layer with RoPE, a global layer with a key convolution), its
    data and training config, small enough for CPU processes; float64."""
    from flashmoba.models import MoBAHybridConfig, MoBAHybridForCausalLM
    from flashmoba.train.data import TokenizedCorpus
    from flashmoba.train.loop import TrainConfig
    from flashmoba.train.packing import PackedStream

    torch.manual_seed(0)
    model_config = MoBAHybridConfig.from_preset(
        "tiny",
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        swa_window=12,
        moba_block_size=8,
        moba_topk=2,
        kconv_size=3,
        global_attn=global_attn,
        attn_backend="reference",
    )
    model = MoBAHybridForCausalLM(model_config).to(torch.float64)
    for module in model.modules():  # a key convolution that is not the identity from the first step
        if module.__class__.__name__ == "KeyConv":
            torch.nn.init.normal_(module.weight, std=0.5)
    rng = np.random.default_rng(0)
    docs = [(rng.integers(VOCAB) + np.arange(rng.integers(5, 90))) % VOCAB for _ in range(60)]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    corpus = TokenizedCorpus(np.concatenate(docs).astype(np.uint16), offsets)
    cfg = TrainConfig(steps=steps, batch_tokens=120, max_seqlen=48, warmup_steps=1, lr=2e-2, checkpoint_every=1000)
    cfg = TrainConfig(**{**cfg.__dict__, **config})
    return model, PackedStream(corpus, cfg.batch_tokens, cfg.max_seqlen, seed=0), cfg


TRAIN_STEPS = 3


def _train_ranks(rank, world_size, run_dir, runs) -> dict:
    from flashmoba.train.loop import Distributed, train

    where = Distributed(rank=rank, world_size=world_size, device=torch.device("cpu"))
    losses = {}
    for name, global_attn, config in runs:
        model, stream, cfg = _micro_run(TRAIN_STEPS, global_attn, **config)
        records = train(model, stream, cfg, os.path.join(run_dir, name), where=where)
        losses[name] = [r["loss"] for r in records]
    return losses


def _single(tmp_path, name, global_attn, **config):
    from flashmoba.train.loop import Distributed, train

    model, stream, cfg = _micro_run(TRAIN_STEPS, global_attn, **config)
    where = Distributed(rank=0, world_size=1, device=torch.device("cpu"))
    return [r["loss"] for r in train(model, stream, cfg, tmp_path / name, where=where)]


@SPAWN
def test_training_loop_with_context_parallelism_equals_one_process(tmp_path):
    """2 ranks splitting every micro-batch (DDP and FSDP2), and a 2 x 2 mesh (2 data-parallel groups of 2),
    follow the single-process loss curve in float64: MoBA and dense global layers, a key convolution
    across rank boundaries, RoPE at global positions, the next-token targets across ranks."""
    runs2 = [
        ("moba", "moba", dict(context_parallel=2)),
        ("dense-fsdp", "dense", dict(context_parallel=2, fsdp=True)),
    ]
    runs4 = [("mesh", "moba", dict(context_parallel=2))]
    cp2 = spawn(2, _train_ranks, str(tmp_path / "cp2"), runs2)
    cp4 = spawn(4, _train_ranks, str(tmp_path / "cp4"), runs4)
    expected = {
        "moba": _single(tmp_path, "moba", "moba"),
        "dense-fsdp": _single(tmp_path, "dense", "dense"),
        "mesh": _single(tmp_path, "mesh", "moba", grad_accum=2),  # 2 data-parallel groups = 2 micro-batches
    }
    # The model's cross entropy is float32 (logits.float()), summed here over a rank's half of the tokens:
    # a few float32 roundings of the loss (eps32 = 1.2e-7) are the only difference, and they carry into
    # the next steps' updates at the same relative size. A wrong target or a lost gradient contribution
    # at a rank boundary moves the loss by ~1e-2.
    for results in (cp2, cp4):
        for rank, losses in results.items():
            for name, curve in losses.items():
                np.testing.assert_allclose(curve, expected[name], rtol=1e-6, err_msg=f"{name} rank {rank}")


CLI = [
    "--preset",
    "tiny",
    "--set",
    "hidden_size=32",
    "num_layers=2",
    "num_heads=2",
    "num_kv_heads=1",
    "head_dim=16",
    "intermediate_size=64",
    "swa_window=16",
    "--block-size",
    "16",
    "--topk",
    "2",
    "--kconv",
    "3",
    "--backend",
    "reference",
    "--tokenizer",
    "bytes",
    "--max-corpus-mb",
    "0.1",
    "--context",
    "128",
    "--batch-tokens",
    "256",
    "--steps",
    "3",
    "--warmup",
    "1",
    "--log-every",
    "1",
    "--needle-fraction",
    "0.25",
    "--device",
    "cpu",
]


def _cli_rank(rank, world_size, args) -> int:
    from flashmoba.cli import main

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))  # what init_distributed reads
    return main(args)


def _logged(run, key="loss"):
    return [json.loads(line)[key] for line in (run / "log.jsonl").read_text().splitlines() if key in line]


@SPAWN
def test_flashmoba_train_context_parallel_follows_the_single_process_run(tmp_path):
    """``flashmoba train --context-parallel 2`` on 2 gloo processes: the loss and validation loss curves of
    the single-process run (float32 on the CPU: to a few float32 roundings), needles mixed in."""
    data = ["--data-dir", str(tmp_path / "data")]
    from flashmoba.cli import main

    assert main(["train", "--out", str(tmp_path / "single"), *data, *CLI]) == 0
    args = ["train", "--out", str(tmp_path / "cp"), *data, *CLI, "--context-parallel", "2"]
    assert spawn(2, _cli_rank, args) == {0: 0, 1: 0}
    for key in ("loss", "val_loss"):
        single, split = _logged(tmp_path / "single", key), _logged(tmp_path / "cp", key)
        assert len(single) == (3 if key == "loss" else 1) and len(split) == len(single)
        np.testing.assert_allclose(split, single, rtol=1e-6, err_msg=key)
    assert json.loads((tmp_path / "cp" / "run.json").read_text())["context_parallel"] == 2


def test_flashmoba_train_refuses_a_context_parallel_degree_it_cannot_use(tmp_path, capsys):
    from flashmoba.cli import main

    out = ["train", "--out", str(tmp_path / "run"), *CLI]
    assert main([*out, "--context-parallel", "3"]) == 2  # 256 tokens are not 6 equal chunks
    assert "--batch-tokens (256) must be divisible by 2 x --context-parallel (6)" in capsys.readouterr().err
    assert main([*out, "--context-parallel", "2"]) == 2  # one process
    assert "--context-parallel 2 must divide the number of processes (1)" in capsys.readouterr().err
    assert main([*out, "--context-parallel", "0"]) == 2
    assert "--context-parallel must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------
# the communication model of benchmarks/bench_context_parallel.py


def _bench():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "bench_context_parallel.py"
    spec = importlib.util.spec_from_file_location("bench_context_parallel", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_communication_model_bytes():
    row = _bench().model_row(1024, 4, 8, 3, 4, 2, 16)
    assert row["all_gather_GB"] * 1e9 == pytest.approx(4 * 3 / 4 * 1024 * 2 * 16 * 2)  # K, V and their gradients
    centroids = 3 / 4 * 1024 / 8 * 2 * 16 * 2
    assert row["selective_GB"] * 1e9 >= centroids
    # every query attends topk * block keys: 3.5 * G * topk * block / ((W - 1) * bytes)
    assert row["flops_per_byte"] == pytest.approx(3.5 * 2 * 3 * 8 / (3 * 2))


@pytest.mark.parametrize(
    "length, world_size, rank, block_size, topk, group", [(256, 2, 0, 8, 3, 2), (512, 4, 3, 4, 2, 1)]
)
def test_communication_model_matches_simulated_uniform_routing(length, world_size, rank, block_size, topk, group):
    """The model's expected share of selected remote blocks against a simulation of its assumption: every
    query head of the rank picks ``topk - 1`` distinct earlier blocks uniformly (all of them if fewer)."""
    fraction, remote = _bench().selected_remote_fraction(length, world_size, rank, block_size, topk, group)
    rng = np.random.default_rng(0)
    positions = local_positions(length, world_size, rank, "zigzag").numpy()
    own = positions // block_size
    remote_blocks = np.setdiff1d(np.arange(length // block_size), own)
    assert len(remote_blocks) == remote
    trials = []
    for _ in range(400):
        chosen = np.zeros(length // block_size, dtype=bool)
        for o in np.repeat(own, group):  # every query head of the KV head
            chosen[rng.permutation(o)[: topk - 1]] = True
        trials.append(chosen[remote_blocks].mean())
    assert abs(np.mean(trials) - fraction) < 4 * np.std(trials) / np.sqrt(len(trials)) + 1e-9
    assert 0 < fraction < 1
