"""The training loop: it learns, it resumes exactly, and it runs under DDP / FSDP2 with 2 CPU processes."""

import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from flashmoba.models import MoBAHybridConfig, MoBAHybridForCausalLM
from flashmoba.train.data import TokenizedCorpus
from flashmoba.train.loop import Distributed, TrainConfig, learning_rate, train
from flashmoba.train.packing import PackedStream

VOCAB = 64


def micro_model(dtype=torch.float32, global_attn="moba"):
    """The real hybrid model (one sliding-window and one MoBA layer), small enough for CPU tests."""
    config = MoBAHybridConfig.from_preset(
        "tiny",
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        intermediate_size=64,
        swa_window=16,
        moba_block_size=8,
        moba_topk=2,
        global_attn=global_attn,
        attn_backend="reference",
    )
    return MoBAHybridForCausalLM(config).to(dtype)


def counting_corpus(num_docs, rng, max_len=200):
    """Documents that count up from a random token (mod VOCAB): every token but the first is predictable."""
    docs = []
    for _ in range(num_docs):
        length, start = rng.integers(20, max_len), rng.integers(VOCAB)
        docs.append((start + np.arange(length)) % VOCAB)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    return TokenizedCorpus(np.concatenate(docs).astype(np.uint16), offsets)


def make_run(tmp_path, steps, seed=0, dtype=torch.float32, **config):
    torch.manual_seed(seed)
    model = micro_model(dtype)
    cfg = TrainConfig(
        steps=steps,
        batch_tokens=128,
        max_seqlen=48,
        warmup_steps=2,
        lr=3e-2,
        seed=seed,
        checkpoint_every=1000,
        **config,
    )
    corpus = counting_corpus(40, np.random.default_rng(seed))
    stream = PackedStream(corpus, cfg.batch_tokens, cfg.max_seqlen, seed=seed)
    return model, stream, cfg


SINGLE = Distributed(rank=0, world_size=1, device=torch.device("cpu"))


def test_learns_a_synthetic_task(tmp_path):
    model, stream, cfg = make_run(tmp_path, steps=25)
    records = train(model, stream, cfg, tmp_path, where=SINGLE)
    uniform = math.log(VOCAB)
    assert records[0]["loss"] > 0.8 * uniform  # starts near chance...
    # ...and ends far below: only the first token of a sequence is unpredictable.
    assert np.mean([r["loss"] for r in records[-5:]]) < 0.15 * uniform
    assert [r["step"] for r in records] == list(range(1, 26))
    assert records[-1]["tokens"] == 25 * cfg.batch_tokens
    assert (tmp_path / "model" / "config.json").exists()  # the final model, loadable with from_pretrained


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    model, stream, cfg = make_run(tmp_path, steps=6)
    full = train(model, stream, cfg, tmp_path / "full", where=SINGLE)
    full_params = {k: v.clone() for k, v in model.state_dict().items()}

    model, stream, cfg = make_run(tmp_path, steps=6)
    first = train(model, stream, cfg, tmp_path / "split", where=SINGLE, stop_at_step=3)
    # A new process would rebuild everything from scratch: a fresh model with a different init.
    model, stream, cfg = make_run(tmp_path, steps=6, seed=0)
    torch.nn.init.normal_(model.lm_head.weight)
    second = train(model, stream, cfg, tmp_path / "split", where=SINGLE, resume=True)

    assert [r["loss"] for r in first + second] == [r["loss"] for r in full]
    assert [r["grad_norm"] for r in first + second] == [r["grad_norm"] for r in full]
    for name, value in model.state_dict().items():
        assert torch.equal(value, full_params[name]), name
    logged = [
        eval(line.replace("NaN", "float('nan')"))["loss"]
        for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()
    ]
    assert logged == [r["loss"] for r in full]


def test_refuses_to_overwrite_a_run(tmp_path):
    model, stream, cfg = make_run(tmp_path, steps=2)
    train(model, stream, cfg, tmp_path, where=SINGLE)
    with pytest.raises(ValueError, match="resume"):
        train(model, stream, cfg, tmp_path, where=SINGLE)


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, batch_tokens=8, max_seqlen=8)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.55)  # half way down the cosine
    assert learning_rate(110, cfg) == pytest.approx(0.1)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, run_dir, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # two processes share the CI machine's cores
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for mode in ("ddp", "fsdp2"):
            model, stream, cfg = make_run(None, steps=DISTRIBUTED_STEPS, dtype=torch.float64, fsdp=mode == "fsdp2")
            where = Distributed(rank=rank, world_size=world_size, device=torch.device("cpu"))
            records = train(model, stream, cfg, Path(run_dir) / mode, where=where)
            results[(mode, rank)] = [r["loss"] for r in records]
    finally:
        torch.distributed.destroy_process_group()


DISTRIBUTED_STEPS = 3


def test_two_processes_match_gradient_accumulation(tmp_path):
    """2 gloo processes x 1 micro-batch == 1 process x 2 accumulated micro-batches (same global data),
    replicated (DDP) and sharded (FSDP2)."""
    # fork: the workers inherit the imported modules instead of importing transformers again.
    with torch.multiprocessing.get_context("fork").Manager() as manager:
        shared = manager.dict()
        torch.multiprocessing.start_processes(
            _worker, args=(2, _free_port(), str(tmp_path), shared), nprocs=2, start_method="fork"
        )
        results = dict(shared)

    model, stream, cfg = make_run(tmp_path, steps=DISTRIBUTED_STEPS, dtype=torch.float64, grad_accum=2)
    single = [r["loss"] for r in train(model, stream, cfg, tmp_path / "single", where=SINGLE)]
    for mode in ("ddp", "fsdp2"):
        assert results[(mode, 0)] == results[(mode, 1)], mode
        # fp64 throughout: only summation order differs, a few ulps per step through Adam's normalisation.
        np.testing.assert_allclose(results[(mode, 0)], single, rtol=1e-10, err_msg=mode)
        distributed = torch.load(tmp_path / mode / "checkpoint.pt", weights_only=False)["model"]
        for name, value in model.state_dict().items():
            torch.testing.assert_close(distributed[name], value, rtol=1e-9, atol=1e-12, msg=f"{mode} {name}")


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path):
    losses = {}
    for checkpointing in (False, True):
        model, stream, cfg = make_run(tmp_path, steps=2, dtype=torch.float64, activation_checkpointing=checkpointing)
        records = train(model, stream, cfg, tmp_path / str(checkpointing), where=SINGLE)
        losses[checkpointing] = [(r["loss"], r["grad_norm"]) for r in records]
    assert model.is_gradient_checkpointing
    # Recomputation repeats the same float64 operations: equal up to summation-order ulps.
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-12)


def test_bf16_autocast_trains_close_to_float32(tmp_path):
    """The GPU default (bf16 autocast) on the CPU: the first loss is the float32 one up to bf16 rounding."""
    first = {}
    for bf16 in (False, True):
        model, stream, cfg = make_run(tmp_path, steps=2, bf16=bf16)
        first[bf16] = [r["loss"] for r in train(model, stream, cfg, tmp_path / str(bf16), where=SINGLE)]
    assert all(math.isfinite(loss) for loss in first[True])
    # Same weights and data at step 1; bf16 keeps 8 mantissa bits: a few units of 2**-8, relative.
    assert first[True][0] == pytest.approx(first[False][0], rel=4 * 2**-8)
    assert first[True][0] != first[False][0]  # autocast was on
