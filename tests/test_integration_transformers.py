"""``attn_implementation="moba"`` in tiny random transformers models (built locally, no hub), float64 on CPU.

* prefill (left/right padded, packed) equals MoBA by definition: an oracle attention function written here
  that runs :func:`flashmoba.reference.attention` on each row's real tokens;
* with topk covering every block (or every layer dense) the model equals its own SDPA attention;
* generate() with a :class:`MoBACache` equals generate() without a cache (the full MoBA prefix recomputed
  every step), also in beam search and with a plain cache; a prompt prefilled in chunks equals one pass;
* settings come from register() and the config; bad settings and right-padded generation are refused.

Comparisons of float64 models use ``torch.testing.assert_close``'s float64 tolerances: the paths differ
only in the order of float64 operations, while a different block selection moves logits by orders of
magnitude more (each test also checks that MoBA differs from dense attention where it should).
"""

import copy
import warnings

import pytest
import torch
from conftest import DEVICE
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from flashmoba import MoBAKVCache, reference
from flashmoba.integrations.transformers import MoBACache, MoBACacheLayer, register

CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}
BLOCK, TOPK = 4, 2
VOCAB = 97


def _config(family, **overrides):
    """A tiny GQA model (4 query heads, 2 KV heads, head dim 16) with MoBA settings in its config."""
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=None,
        attention_dropout=0.0,
        moba_block_size=BLOCK,
        moba_topk=TOPK,
        pad_token_id=0,
    )
    fields.update(overrides)
    return CONFIGS[family](**fields)


def _models(config, *implementations):
    """The same random weights under each attention implementation, float64, eval mode.

    Each model gets its own copy of the config: modules read the implementation from it at every call.
    """
    torch.manual_seed(1234)
    first = AutoModelForCausalLM.from_config(
        copy.deepcopy(config), attn_implementation=implementations[0], dtype=torch.float64
    )
    models = [first.eval()]
    for name in implementations[1:]:
        other = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name, dtype=torch.float64)
        other.load_state_dict(first.state_dict())
        models.append(other.eval())
    return models


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """MoBA by definition: each row's real tokens form one sequence, the queries are its newest rows."""
    config = module.config
    dense = module.layer_idx in {i % config.num_hidden_layers for i in (config.moba_dense_layers or ())}
    B, HQ, Tq, D = query.shape
    Tk = key.shape[2]
    out = query.new_zeros(B, Tq, HQ, D)
    for b in range(B):
        real = torch.ones(Tk, dtype=torch.bool) if attention_mask is None else attention_mask[b, -Tk:].bool()
        position = torch.cumsum(real, 0) - 1  # of each cache row within the row's sequence
        length = int(real.sum())
        q_rows = [j for j in range(Tq) if real[Tk - Tq + j]]
        q_full = query.new_zeros(length, HQ, D)  # earlier queries do not influence later outputs
        q_full[position[Tk - Tq + torch.tensor(q_rows)]] = query[b, :, q_rows].transpose(0, 1)
        topk = length if dense else config.moba_topk
        o, _ = reference.attention(
            q_full,
            key[b, :, real].transpose(0, 1),
            value[b, :, real].transpose(0, 1),
            torch.tensor([0, length]),
            config.moba_block_size,
            max(topk, 1),
            True,
            scaling,
        )
        out[b, q_rows] = o[position[Tk - Tq + torch.tensor(q_rows)]]
    return out, None


AttentionInterface.register("moba_oracle", _oracle_attention)
AttentionMaskInterface.register("moba_oracle", flash_attention_mask)


@pytest.fixture(autouse=True)
def _registered():
    register(block_size=BLOCK, topk=TOPK, backend="reference")


def _padded_batch(lens, left=True):
    ids = torch.randint(1, VOCAB, (len(lens), max(lens)))
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lens):
        if left:
            mask[b, max(lens) - n :] = 1
        else:
            mask[b, :n] = 1
    return ids * mask, mask


def _assert_logits_close(actual, expected, mask=None):
    if mask is not None:
        actual, expected = actual[mask.bool()], expected[mask.bool()]
    torch.testing.assert_close(actual, expected)


def _assert_differ(a, b):
    assert (a - b).abs().max() > 1e-3, "MoBA should differ from dense attention here"


# ---------------------------------------------------------------------------------------------------
# prefill


@pytest.mark.parametrize("family, dense_layers", [("llama", ()), ("qwen2", (-1,)), ("qwen3", ()), ("mistral", ())])
def test_prefill_equals_moba_by_definition(family, dense_layers):
    moba, oracle, sdpa = _models(_config(family, moba_dense_layers=dense_layers), "moba", "moba_oracle", "sdpa")
    ids, mask = _padded_batch((23, 30, 9))
    mask[2] = mask[2].flip(0)  # one right-padded row: prefill unpads any mask
    ids = ids * mask
    with torch.no_grad():
        logits = moba(ids, attention_mask=mask).logits
        _assert_logits_close(logits, oracle(ids, attention_mask=mask).logits, mask)
        _assert_differ(logits[mask.bool()], sdpa(ids, attention_mask=mask).logits[mask.bool()])


def test_packed_sequences_equal_separate_ones():
    (moba,) = _models(_config("llama"), "moba")
    lens = (13, 22, 6)
    seqs = [torch.randint(1, VOCAB, (1, n)) for n in lens]
    with torch.no_grad():
        separate = torch.cat([moba(s).logits for s in seqs], dim=1)
        packed_ids = torch.cat(seqs, dim=1)
        position_ids = torch.cat([torch.arange(n) for n in lens])[None]
        _assert_logits_close(moba(packed_ids, position_ids=position_ids).logits, separate)
        cu = torch.tensor([0, 13, 35, 41], dtype=torch.int32)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=22, max_length_k=22)
        _assert_logits_close(moba(packed_ids, position_ids=position_ids, **kwargs).logits, separate)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_topk_covering_all_blocks_equals_sdpa(family):
    moba, sdpa = _models(_config(family, moba_topk=64), "moba", "sdpa")
    ids, mask = _padded_batch((31, 18))
    with torch.no_grad():
        _assert_logits_close(moba(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits, mask)


# ---------------------------------------------------------------------------------------------------
# generation


def _generate(model, ids, mask, new_tokens=8, **kwargs):
    """Greedy generation (8 new tokens cross two blocks of 4) -> (sequences, logits [B, new, V] or None)."""
    kwargs = {"output_logits": True, **kwargs}
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        pad_token_id=0,
        **kwargs,
    )
    return out.sequences, torch.stack(out.logits, dim=1) if out.logits is not None else None


@pytest.mark.parametrize(
    "family, dense_layers, shared", [("llama", (), False), ("qwen2", (-1,), False), ("llama", (), True)]
)
def test_generate_with_cache_equals_recomputing_the_prefix(family, dense_layers, shared):
    config = _config(family, moba_dense_layers=dense_layers, moba_shared_kv_routing=shared)
    moba, sdpa = _models(config, "moba", "sdpa")
    ids, mask = _padded_batch((14, 9, 17))
    cache = MoBACache()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # in particular: no fallback to rebuilding the centroids
        tokens, logits = _generate(moba, ids, mask, past_key_values=cache)
    with torch.no_grad():
        tokens_full, logits_full = _generate(moba, ids, mask, use_cache=False)
    if shared:  # shared routing is a decode-only approximation: the same pipeline, other selections
        _assert_differ(logits, logits_full)
        return
    with torch.no_grad():
        _, logits_sdpa = _generate(sdpa, ids, mask, use_cache=False)
    assert torch.equal(tokens, tokens_full)
    _assert_logits_close(logits, logits_full)
    _assert_differ(logits, logits_sdpa)
    # Every MoBA layer's cache holds the block sums of all its tokens, folded in one step at a time: they equal
    # the sums of a cache built over the same rows at once. Dense layers keep none.
    dense = {i % 2 for i in dense_layers}
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, MoBACacheLayer) and layer.get_seq_length() == tokens.shape[1] - 1
        kv = layer.cache
        assert kv.block_size == (None if i in dense else BLOCK)
        if i not in dense:
            at_once = MoBAKVCache.from_tensors(kv.k, kv.v, kv.seqlens, starts=kv.starts, block_size=BLOCK)
            torch.testing.assert_close(kv.block_sums, at_once.block_sums)


def test_generate_with_a_plain_cache_warns_and_matches():
    (moba,) = _models(_config("llama"), "moba")
    ids, mask = _padded_batch((12, 7))
    with torch.no_grad():
        with pytest.warns(UserWarning, match="MoBACache"):
            tokens, logits = _generate(moba, ids, mask)
        tokens_full, logits_full = _generate(moba, ids, mask, use_cache=False)
    assert torch.equal(tokens, tokens_full)
    _assert_logits_close(logits, logits_full)


def test_beam_search_with_cache_equals_recomputing_the_prefix():
    (moba,) = _models(_config("llama"), "moba")
    ids, mask = _padded_batch((10, 15))
    kwargs = dict(num_beams=2, num_return_sequences=2, output_logits=False, new_tokens=6)
    with torch.no_grad():
        tokens, _ = _generate(moba, ids, mask, past_key_values=MoBACache(), **kwargs)
        tokens_full, _ = _generate(moba, ids, mask, use_cache=False, **kwargs)
    assert torch.equal(tokens, tokens_full)


def test_prompt_prefilled_in_chunks_equals_one_pass():
    (moba,) = _models(_config("qwen3"), "moba")
    ids, mask = _padded_batch((27, 20))
    cache = MoBACache()
    with torch.no_grad():
        whole = moba(ids, attention_mask=mask).logits
        first = moba(ids[:, :11], attention_mask=mask[:, :11], past_key_values=cache, use_cache=True).logits
        # The prefill tells every layer's cache its rows' left padding.
        assert [layer.get_seq_length() for layer in cache.layers] == [11, 11]
        assert all(layer.cache.starts.tolist() == (11 - mask[:, :11].sum(1)).tolist() for layer in cache.layers)
        second = moba(ids[:, 11:], attention_mask=mask, past_key_values=cache, use_cache=True).logits
    _assert_logits_close(torch.cat([first, second], dim=1), whole, mask)


# ---------------------------------------------------------------------------------------------------
# settings and refusals


def test_config_overrides_register_and_dense_layers_cover_all():
    register(block_size=BLOCK, topk=64, backend="reference")  # dense by topk ...
    fields = dict(moba_block_size=None, moba_topk=None)
    moba, sdpa = _models(_config("llama", **fields), "moba", "sdpa")
    ids, mask = _padded_batch((26, 13))
    with torch.no_grad():
        dense_logits = sdpa(ids, attention_mask=mask).logits
        _assert_logits_close(moba(ids, attention_mask=mask).logits, dense_logits, mask)
        moba.config.moba_topk = TOPK  # ... until the config says otherwise ...
        sparse_logits = moba(ids, attention_mask=mask).logits
        _assert_differ(sparse_logits[mask.bool()], dense_logits[mask.bool()])
        moba.config.moba_dense_layers = [0, -1]  # ... or every layer is dense
        _assert_logits_close(moba(ids, attention_mask=mask).logits, dense_logits, mask)


@pytest.mark.parametrize(
    "field, value, error, match",
    [
        ("moba_topk", 0, ValueError, "topk must be >= 1"),
        ("moba_block_size", 2.5, TypeError, "block_size must be an int"),
        ("moba_dense_layers", [5], ValueError, "dense layer index 5 is out of range"),
        ("moba_dense_layers", "0", TypeError, "dense_layers must be a sequence"),
        ("attention_dropout", 0.1, ValueError, "no dropout"),
    ],
)
def test_bad_settings_are_refused(field, value, error, match):
    (moba,) = _models(_config("llama", **{field: value}), "moba")
    moba.train(field == "attention_dropout")  # attention modules apply dropout in training only
    with pytest.raises(error, match=match):
        moba(torch.randint(1, VOCAB, (1, 9)))


def test_register_refuses_bad_arguments():
    with pytest.raises(ValueError, match="backend must be one of"):
        register(backend="cuda")
    with pytest.raises(TypeError, match="shared_kv_routing must be a bool"):
        register(shared_kv_routing="yes")


def test_padding_among_new_tokens_over_a_cache_is_refused():
    (moba,) = _models(_config("llama"), "moba")
    ids, mask = _padded_batch((20, 3))
    cache = MoBACache()
    with torch.no_grad():
        moba(ids[:, :10], attention_mask=mask[:, :10], past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="must be real"):
            moba(ids[:, 10:], attention_mask=mask, past_key_values=cache, use_cache=True)


def test_generation_after_right_padding_is_refused():
    (moba,) = _models(_config("llama"), "moba")
    ids, mask = _padded_batch((12, 7), left=False)
    with torch.no_grad(), pytest.raises(ValueError, match="left padding"):
        moba.generate(
            ids, attention_mask=mask, max_new_tokens=2, do_sample=False, past_key_values=MoBACache(), pad_token_id=0
        )


@pytest.mark.skipif(DEVICE != "cuda", reason="the Triton path needs a CUDA GPU (the H100 suite)")
def test_generation_on_gpu_through_triton_matches_the_reference():
    """generate() on the Triton path (MoBA prefill kernels, sparse decode) checked teacher-forced: the
    logits of every generated step against the float64 reference recomputing the whole sequence, within
    twice the error of the same reference in float32 (the FlashAttention rule)."""
    block_size, topk, new = 16, 3, 40
    (model64,) = _models(_config("llama", moba_block_size=block_size, moba_topk=topk), "moba")
    model64 = model64.to(DEVICE)
    model32 = copy.deepcopy(model64).float()
    ids, mask = (t.to(DEVICE) for t in _padded_batch((70, 45)))
    register(block_size=block_size, topk=topk, backend="auto")
    with torch.no_grad():
        tokens, logits = _generate(model32, ids, mask, new_tokens=new, past_key_values=MoBACache())
    register(block_size=block_size, topk=topk, backend="reference")
    full_mask = torch.cat([mask, torch.ones_like(tokens[:, ids.shape[1] :])], dim=1)
    steps = slice(ids.shape[1] - 1, -1)
    with torch.no_grad():
        exact = model64(tokens, attention_mask=full_mask).logits[:, steps]
        lowp = model32(tokens, attention_mask=full_mask).logits[:, steps]
    err = (logits.double() - exact).abs().max().item()
    ref_err = (lowp.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + torch.finfo(torch.float32).eps * exact.abs().max().item(), (err, ref_err)
