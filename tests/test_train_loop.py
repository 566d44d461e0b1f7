"""The training loop: it learns, it resumes exactly, and it runs under DDP / FSDP2 with 2 CPU processes."""

import math
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flashmoba.train.data import TokenizedCorpus
from flashmoba.train.loop import Distributed, TrainConfig, learning_rate, train
from flashmoba.train.packing import PackedStream

VOCAB = 64


class TinyPackedLM(torch.nn.Module):
    """Stand-in causal LM with the model contract: attention restricted to each cu_seqlens segment."""

    def __init__(self, vocab=VOCAB, dim=32, dtype=torch.float32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim, dtype=dtype)
        self.qkv = torch.nn.Linear(dim, 3 * dim, dtype=dtype)
        self.norm = torch.nn.LayerNorm(dim, dtype=dtype)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(dim, dim, dtype=dtype) for _ in range(2)])
        self.head = torch.nn.Linear(dim, vocab, dtype=dtype)

    def gradient_checkpointing_enable(self):
        pass

    def forward(self, input_ids, cu_seqlens, labels=None):
        ids = input_ids[0]
        n = ids.shape[0]
        seq = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(n), right=True)
        pos = torch.arange(n)
        allowed = (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])
        x = self.embed(ids)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = x + F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=allowed)[0]
        for block in self.blocks:
            x = x + torch.tanh(block(self.norm(x)))
        logits = self.head(x)[None]
        same_seq = seq[1:] == seq[:-1]  # never predict across a boundary
        loss = F.cross_entropy(logits[0, :-1][same_seq], labels[0, 1:][same_seq])
        return SimpleNamespace(loss=loss, logits=logits)


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
    model = TinyPackedLM(dtype=dtype)
    cfg = TrainConfig(steps=steps, batch_tokens=256, max_seqlen=64, warmup_steps=2, lr=3e-3, seed=seed,
                      checkpoint_every=1000, **config)
    corpus = counting_corpus(40, np.random.default_rng(seed))
    stream = PackedStream(corpus, cfg.batch_tokens, cfg.max_seqlen, seed=seed)
    return model, stream, cfg


SINGLE = Distributed(rank=0, world_size=1, device=torch.device("cpu"))


def test_learns_a_synthetic_task(tmp_path):
    model, stream, cfg = make_run(tmp_path, steps=60)
    records = train(model, stream, cfg, tmp_path, where=SINGLE)
    uniform = math.log(VOCAB)
    assert records[0]["loss"] > 0.8 * uniform  # starts near chance...
    # ...and ends far below: only the first token of a sequence is unpredictable.
    assert np.mean([r["loss"] for r in records[-5:]]) < 0.15 * uniform
    assert [r["step"] for r in records] == list(range(1, 61))
    assert records[-1]["tokens"] == 60 * cfg.batch_tokens


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    model, stream, cfg = make_run(tmp_path, steps=8)
    full = train(model, stream, cfg, tmp_path / "full", where=SINGLE)
    full_params = {k: v.clone() for k, v in model.state_dict().items()}

    model, stream, cfg = make_run(tmp_path, steps=8)
    first = train(model, stream, cfg, tmp_path / "split", where=SINGLE, stop_at_step=3)
    # A new process would rebuild everything from scratch: a fresh model with a different init.
    model, stream, cfg = make_run(tmp_path, steps=8, seed=0)
    torch.nn.init.normal_(model.head.weight)
    second = train(model, stream, cfg, tmp_path / "split", where=SINGLE, resume=True)

    assert [r["loss"] for r in first + second] == [r["loss"] for r in full]
    assert [r["grad_norm"] for r in first + second] == [r["grad_norm"] for r in full]
    for name, value in model.state_dict().items():
        assert torch.equal(value, full_params[name]), name
    logged = [eval(line.replace("NaN", "float('nan')"))["loss"] for line in
              (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
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


def _worker(rank, world_size, port, run_dir, fsdp, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model, stream, cfg = make_run(Path(run_dir), steps=4, dtype=torch.float64, fsdp=fsdp)
        where = Distributed(rank=rank, world_size=world_size, device=torch.device("cpu"))
        records = train(model, stream, cfg, Path(run_dir), where=where)
        results[rank] = [r["loss"] for r in records]
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_match_gradient_accumulation(tmp_path, fsdp):
    """2 gloo processes x 1 micro-batch == 1 process x 2 accumulated micro-batches (same global data)."""
    manager = torch.multiprocessing.get_context("spawn").Manager()
    results = manager.dict()
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp"), fsdp, results), nprocs=2)

    model, stream, cfg = make_run(tmp_path, steps=4, dtype=torch.float64, grad_accum=2)
    single = [r["loss"] for r in train(model, stream, cfg, tmp_path / "single", where=SINGLE)]

    assert results[0] == results[1]
    # fp64 throughout: only summation order differs, a few ulps per step through Adam's normalisation.
    np.testing.assert_allclose(results[0], single, rtol=1e-10)
    distributed = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)["model"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-9, atol=1e-12)
