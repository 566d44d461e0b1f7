"""The training loop: the paper's recipe on packed sequences, with exact resume and multi-process training.

Recipe: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only), linear warmup then cosine decay to
``min_lr_ratio * lr``, gradient clipping at 1.0, bf16 autocast on GPUs, optional activation checkpointing.

Exact resume: the learning rate is a function of the step, the data stream's state is three integers and
the needle mix a pure function of the micro-batch index, so a checkpoint (model, optimizer, step, stream,
RNG states) restores everything; on the CPU a resumed run reproduces the uninterrupted one bit for bit.

Several processes: start with ``torchrun`` (or anything that sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT); NCCL on GPUs, gloo on CPUs. Every step consumes ``world_size * grad_accum``
micro-batches of the one global stream, rank ``r`` taking micro-batches ``r, r + world_size, ...``, so the
data of a step does not depend on how it is split. ``TrainConfig.fsdp`` shards with FSDP2 (``fully_shard``)
instead of replicating with DDP.

Context parallelism (``TrainConfig.context_parallel = C``): the processes form a ``(dp, cp)`` device mesh
of ``world_size / C`` data-parallel groups of ``C`` ranks; the ``C`` ranks of a group split every
micro-batch of their group (:class:`flashmoba.distributed.ContextParallel`), so a step consumes
``dp * grad_accum`` micro-batches. Each rank's loss is its share of the micro-batch's mean, scaled by ``C``
before the backward because DDP and FSDP2 average gradients over all ``world_size`` ranks. FSDP2 shards
over the flattened mesh: the ranks of a group compute different gradients of the same parameters, so they
take part in the gradient reduction anyway, and sharding over all of them keeps ``1 / world_size`` of the
parameters and optimizer state per rank instead of ``1 / dp``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from tqdm.auto import tqdm

from flashmoba._checks import check_int
from flashmoba.distributed.training import ContextParallel
from flashmoba.train.packing import PackedBatch, PackedStream

__all__ = ["TrainConfig", "Distributed", "init_distributed", "learning_rate", "make_optimizer", "train"]

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
FINAL_MODEL = "model"


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings (token counts are per micro-batch and process)."""

    steps: int = 200
    batch_tokens: int = 8192
    grad_accum: int = 1
    max_seqlen: int = 1024
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0
    checkpoint_every: int = 100
    activation_checkpointing: bool = False
    compile: bool | None = None  # None: compile the decoder layers on CUDA in one-process / DDP runs
    bf16: bool | None = None  # None: bf16 autocast on CUDA, fp32 elsewhere
    fsdp: bool = False
    context_parallel: int = 1  # ranks that split each micro-batch (a divisor of the world size)

    def __post_init__(self):
        minimum = {"warmup_steps": 0, "eval_every": 0}
        for name in (
            "steps",
            "batch_tokens",
            "grad_accum",
            "max_seqlen",
            "log_every",
            "checkpoint_every",
            "warmup_steps",
            "eval_every",
            "context_parallel",
        ):
            setattr(self, name, check_int(name, getattr(self, name), minimum.get(name, 1)))
        if self.max_seqlen > self.batch_tokens:
            raise ValueError(f"max_seqlen ({self.max_seqlen}) must not exceed batch_tokens ({self.batch_tokens})")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr}, {self.min_lr_ratio}")


@dataclass
class Distributed:
    """Where this process runs: ``rank`` of ``world_size``, on ``device``."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment (single process otherwise).

    Args:
        device: "cuda" / "cpu" (default: CUDA when available; rank ``r`` uses GPU ``LOCAL_RANK``).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device(kind)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
    return Distributed(rank=rank, world_size=world_size, device=where)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps`` then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear and embedding weights), none on norms and biases, nor on
    the parameters of modules whose class sets ``no_weight_decay = True`` (the key convolution, whose
    weights are a deviation from the identity that decay would erase); fused on CUDA."""
    exempt = {id(p) for m in model.modules() if getattr(m, "no_weight_decay", None) is True for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p.dim() >= 2 and id(p) not in exempt for p in params]
    groups = [
        {"params": [p for p, d in zip(params, decay) if d], "weight_decay": config.weight_decay},
        {"params": [p for p, d in zip(params, decay) if not d], "weight_decay": 0.0},
    ]
    # The fused CUDA kernel (one launch for all parameters) where every parameter is a plain CUDA tensor;
    # FSDP2's sharded parameters (DTensors) keep the default implementation.
    fused = bool(params) and all(p.is_cuda and type(p) is torch.nn.Parameter for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused or None)


def _wrap(model: torch.nn.Module, config: TrainConfig, where: Distributed) -> torch.nn.Module:
    if where.world_size == 1:
        return model
    if config.fsdp:
        from torch.distributed.fsdp import fully_shard

        for module in list(model.modules()):
            if isinstance(module, torch.nn.ModuleList):
                for block in module:
                    fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[where.device.index] if where.device.type == "cuda" else None)


def _gradient_sync(wrapped: torch.nn.Module, enabled: bool):
    """DDP: ``no_sync`` on all but the last micro-batch; FSDP2: ``set_requires_gradient_sync``."""
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync") and not enabled:
        return wrapped.no_sync()
    return contextlib.nullcontext()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _all_ranks(obj, where: Distributed) -> list:
    if where.world_size == 1:
        return [obj]
    gathered = [None] * where.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def _save_checkpoint(path: Path, wrapped, optimizer, step: int, stream: PackedStream, where: Distributed):
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(wrapped, optimizer, options=options)
    rng_states = _all_ranks(_rng_state(), where)
    if where.is_main:
        payload = {
            "step": step,
            "model": model_state,
            "optimizer": optim_state,
            "stream": stream.state_dict(),
            "rng": rng_states,
        }
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)  # never leave a half-written checkpoint behind
    if where.world_size > 1:
        dist.barrier()


def _load_checkpoint(path: Path, wrapped, optimizer, stream: PackedStream, where: Distributed) -> int:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    options = StateDictOptions(full_state_dict=True)
    set_state_dict(
        wrapped, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optimizer"], options=options
    )
    stream.load_state_dict(payload["stream"])
    if len(payload["rng"]) != where.world_size:
        raise ValueError(f"{path} was written by {len(payload['rng'])} processes, this run has {where.world_size}")
    _set_rng_state(payload["rng"][where.rank])
    return payload["step"]


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log records past the checkpoint we resume from, so the log reads as one uninterrupted run."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in lines))


def _mean_over_ranks(value: torch.Tensor, where: Distributed, cp: ContextParallel | None = None) -> float:
    """The mean of ``value`` over the data-parallel groups (with ``cp``: of its sum over each group)."""
    if where.world_size > 1:
        dist.all_reduce(value)
        value = value / (where.world_size // (cp.world_size if cp else 1))
    return float(value)


def _context_parallel(config: TrainConfig, where: Distributed) -> ContextParallel | None:
    """This rank's group of the (dp, cp) device mesh, or None without context parallelism."""
    if config.context_parallel == 1:
        return None
    if where.world_size % config.context_parallel:
        raise ValueError(
            f"context_parallel ({config.context_parallel}) must divide the number of processes ({where.world_size})"
        )
    from torch.distributed.device_mesh import init_device_mesh

    shape = (where.world_size // config.context_parallel, config.context_parallel)
    mesh = init_device_mesh(where.device.type, shape, mesh_dim_names=("dp", "cp"))
    return ContextParallel(mesh.get_group("cp"))


def _compiles(config: TrainConfig, where: Distributed) -> bool:
    """Whether the run compiles its decoder layers: ``config.compile``, or by default on CUDA when no
    context parallelism or FSDP wraps the layers (those paths are not compiled by default)."""
    if config.compile is not None:
        return config.compile
    return where.device.type == "cuda" and config.context_parallel == 1 and not config.fsdp


def _loss(wrapped, batch: PackedBatch, cp: ContextParallel | None) -> torch.Tensor:
    """The micro-batch's mean loss, or with ``cp`` this rank's share of it."""
    if cp is None:
        return wrapped(
            input_ids=batch.input_ids,
            cu_seqlens=batch.cu_seqlens,
            labels=batch.input_ids,
            max_seqlen=batch.max_seqlen,
        ).loss
    part = cp.shard_batch(batch.input_ids, batch.cu_seqlens)
    logits = wrapped(input_ids=part.input_ids, cu_seqlens=part.cu_seqlens, max_seqlen=batch.max_seqlen).logits
    return cp.loss(logits, part)


@torch.no_grad()
def _validation_loss(wrapped, batches: list[PackedBatch], where: Distributed, autocast, cp=None) -> float:
    wrapped.eval()
    total = torch.zeros((), dtype=torch.float64, device=where.device)
    for batch in batches:
        with autocast:
            total += _loss(wrapped, batch.to(where.device), cp).double()
    wrapped.train()
    return _mean_over_ranks(total / max(1, len(batches)), where, cp)


def train(
    model: torch.nn.Module,
    stream: PackedStream,
    config: TrainConfig,
    run_dir: Path,
    *,
    where: Distributed | None = None,
    resume: bool = False,
    stop_at_step: int | None = None,
    val_batches: list[PackedBatch] | None = None,
) -> list[dict]:
    """Train ``model`` on ``stream`` and write checkpoints, the JSONL log and the final model to ``run_dir``.

    Args:
        model: follows the project's model contract: ``model(input_ids=[1, N], cu_seqlens=int32 [S + 1],
            labels=[1, N], max_seqlen=int or None).loss``; ``gradient_checkpointing_enable()`` if activation
            checkpointing is on;
            ``save_pretrained(dir, state_dict=...)`` for the final save (skipped when absent).
        stream: the training micro-batches (``config.batch_tokens`` tokens each).
        config: :class:`TrainConfig`.
        run_dir: output folder (``log.jsonl``, ``checkpoint.pt``, ``model/``).
        where: from :func:`init_distributed` (default: this process alone on CUDA if present, else CPU).
        resume: continue from ``run_dir/checkpoint.pt`` (its step, data position, optimizer and RNG).
        stop_at_step: end (with a checkpoint) after this step, as if interrupted; ``config.steps`` still
            defines the schedule.
        val_batches: batches for the validation loss logged every ``config.eval_every`` steps (the same
            batches on every rank).

    Returns:
        The log records of this call (one dict per logged step: step, loss, lr, grad_norm, tokens, ...).
    """
    where = where or init_distributed()
    if stream.batch_tokens != config.batch_tokens or stream.max_seqlen != config.max_seqlen:
        raise ValueError("stream and config disagree on batch_tokens / max_seqlen")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, log_path = run_dir / CHECKPOINT, run_dir / LOG
    if config.activation_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(where.device)
    model.train()
    cp = _context_parallel(config, where)
    if cp is not None:
        cp.apply(model)
    if _compiles(config, where):
        if not hasattr(model, "compile_layers"):
            raise ValueError(f"compile=True needs a model with compile_layers(), got {type(model).__name__}")
        model.compile_layers()
    wrapped = _wrap(model, config, where)
    optimizer = make_optimizer(wrapped, config)
    step = 0
    if resume:
        if not checkpoint.exists():
            raise ValueError(f"resume=True but {checkpoint} does not exist")
        step = _load_checkpoint(checkpoint, wrapped, optimizer, stream, where)
        if where.is_main:
            _truncate_log(log_path, step)
    elif checkpoint.exists():
        raise ValueError(f"{checkpoint} exists: pass resume=True (--resume) or choose another run folder")
    elif where.is_main:
        log_path.unlink(missing_ok=True)
    bf16 = where.device.type == "cuda" if config.bf16 is None else config.bf16
    autocast = torch.autocast(where.device.type, dtype=torch.bfloat16, enabled=bf16)
    last_step = config.steps if stop_at_step is None else min(stop_at_step, config.steps)
    dp_size, dp_rank = where.world_size // config.context_parallel, where.rank // config.context_parallel
    micro_per_step = dp_size * config.grad_accum
    tokens_per_step = micro_per_step * config.batch_tokens
    records = []
    bar = tqdm(total=config.steps, initial=step, disable=not where.is_main, unit="step", dynamic_ncols=True)
    interval_start, interval_tokens = time.perf_counter(), 0
    while step < last_step:
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [stream.next_batch() for _ in range(micro_per_step)][dp_rank::dp_size]
        loss_sum = torch.zeros((), dtype=torch.float64, device=where.device)
        for i, batch in enumerate(batches):
            batch = batch.to(where.device)
            with _gradient_sync(wrapped, enabled=i == len(batches) - 1), autocast:
                loss = _loss(wrapped, batch, cp)
                (loss * config.context_parallel / config.grad_accum).backward()
            loss_sum += loss.detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        interval_tokens += tokens_per_step
        if step % config.log_every == 0 or step == config.steps:  # the same steps whether or not interrupted
            elapsed = time.perf_counter() - interval_start
            record = {
                "step": step,
                "loss": _mean_over_ranks(loss_sum / config.grad_accum, where, cp),
                "lr": lr,
                "grad_norm": float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm),
                "tokens": step * tokens_per_step,
                "tokens_per_s": interval_tokens / elapsed,
            }
            if config.eval_every and val_batches and (step % config.eval_every == 0 or step == config.steps):
                record["val_loss"] = _validation_loss(wrapped, val_batches, where, autocast, cp)
            records.append(record)
            if where.is_main:
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            interval_start, interval_tokens = time.perf_counter(), 0
        bar.update(1)
        if step % config.checkpoint_every == 0 or step == last_step:
            _save_checkpoint(checkpoint, wrapped, optimizer, step, stream, where)
    bar.close()
    if step == config.steps and hasattr(model, "save_pretrained"):
        model_state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if where.is_main:
            model.save_pretrained(str(run_dir / FINAL_MODEL), state_dict=model_state)
    if where.is_main:
        (run_dir / "train_config.json").write_text(json.dumps(asdict(config), indent=2))
    return records
