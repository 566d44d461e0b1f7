"""The hybrid model on CPU with the tiny preset (reference backend).

Two float64 evaluations that should agree (packed vs separate documents, padded vs unpadded, checkpointed
vs not, saved vs loaded) must differ by less than what float32 rounding alone does to the same
computation (the same model run in float32): any real mismatch is orders of magnitude larger.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from flashmoba.models import MoBAHybridCache, MoBAHybridConfig, MoBAHybridForCausalLM


def _model(dtype=torch.float64, **overrides):
    config = MoBAHybridConfig.from_preset("tiny", attn_backend="reference", **overrides)
    model = MoBAHybridForCausalLM(config).to(dtype).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.self_attn.key_conv is not None:  # the zero init is the identity: make it do something
                layer.self_attn.key_conv.weight.normal_(std=0.5)
    return model


def _rounding_scale(model, *args, **kwargs):
    """max |logits(float32) - logits(float64)| of this input: the tolerance of float64 comparisons."""
    with torch.no_grad():
        low = MoBAHybridForCausalLM(model.config).eval()
        low.load_state_dict(model.state_dict())
        return float((low.float()(*args, **kwargs).logits.double() - model(*args, **kwargs).logits).abs().max())


def _ids(*shape):
    return torch.randint(1, 1024, shape)


def test_presets_and_layer_layout():
    config = MoBAHybridConfig.from_preset("340m", kconv_size=3)
    assert (
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.intermediate_size,
        config.head_dim,
    ) == (24, 1024, 16, 2816, 64)
    assert config.kconv_size == 3 and config.num_key_value_heads == 16
    big = MoBAHybridConfig.from_preset("1b")
    assert (big.num_layers, big.hidden_size, big.num_heads, big.intermediate_size) == (24, 2048, 32, 8192)
    assert config.layer_attn_types[:4] == ["swa", "moba", "swa", "moba"]  # 1-based odd layers: SWA
    model = _model(kconv_size=3, global_attn="dense")
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        assert attn.attn_type == ("swa" if i % 2 == 0 else "dense")
        assert attn.rope == (i % 2 == 0) and (attn.key_conv is None) == (i % 2 == 0)
    assert 0.5e6 < model.num_parameters() < 2e6
    with pytest.raises(ValueError, match="unknown preset"):
        MoBAHybridConfig.from_preset("7b")
    with pytest.raises(ValueError, match="global_attn"):
        MoBAHybridConfig.from_preset("tiny", global_attn="swa")


def test_forward_backward_and_shifted_loss():
    model = _model(torch.float32, kconv_size=3).eval()
    ids = _ids(2, 50)
    labels = ids.clone()
    labels[0, 10:20] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 50, 1024) and out.past_key_values is None
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, 1024), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def test_empty_documents_change_no_target():
    model = _model(torch.float64).eval()
    ids = _ids(1, 12)
    with torch.no_grad():
        plain = model(ids, cu_seqlens=torch.tensor([0, 5, 12], dtype=torch.int32), labels=ids).loss
        empties = model(ids, cu_seqlens=torch.tensor([0, 0, 5, 5, 12, 12], dtype=torch.int32), labels=ids).loss
    torch.testing.assert_close(empties, plain, rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk", [7, 4096])
def test_training_loss_is_fused_and_equals_the_plain_one(chunk):
    """Training mode computes the loss chunk by chunk without logits; loss and every gradient equal those
    of the plain path (full logits) on the same weights, in float64."""
    model = _model(torch.float64, kconv_size=3)
    lens = [37, 1, 52, 20]
    ids = _ids(1, sum(lens))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    labels = ids.clone()
    labels[0, 5:9] = -100
    results = {}
    for name, chunk_size in (("fused", chunk), ("plain", 0)):
        model.config.loss_chunk_size = chunk_size
        model.zero_grad()
        out = model.train()(ids, cu_seqlens=cu, labels=labels)
        assert (out.logits is None) == (name == "fused")
        out.loss.backward()
        results[name] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results["fused"][0], results["plain"][0], rtol=1e-12, atol=0)
    for n, g in results["plain"][1].items():
        torch.testing.assert_close(results["fused"][1][n], g, rtol=1e-10, atol=1e-14, msg=n)


def test_packed_documents_equal_separate_runs():
    model = _model(kconv_size=3)
    lens = [37, 1, 52, 20]
    ids = _ids(1, sum(lens))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    tol = _rounding_scale(model, ids, cu_seqlens=cu)
    with torch.no_grad():
        packed = model(ids, cu_seqlens=cu, labels=ids)
        pieces = [model(ids[:, a:b], labels=ids[:, a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    separate = torch.cat([p.logits for p in pieces], dim=1)
    assert float((packed.logits - separate).abs().max()) < tol
    # The loss never predicts across a boundary: the token-weighted mean of the per-document losses.
    weights = [n - 1 for n in lens]
    want = sum(w * p.loss for w, p in zip(weights, pieces) if w) / sum(weights)
    assert abs(float(packed.loss - want)) < tol


@pytest.mark.parametrize("global_attn", ["dense", "moba"])
def test_documents_of_one_length_run_as_a_batch(monkeypatch, global_attn):
    """Packed documents of one length take the layers' batched path: the same logits, loss and gradients
    as the varlen path, the packed boundaries returned; any other lengths keep the varlen path."""
    from flashmoba.models import hybrid

    model = _model(kconv_size=3, global_attn=global_attn)
    ids = _ids(1, 3 * 40)
    cu = torch.tensor([0, 40, 80, 120], dtype=torch.int32)
    batches = []  # the batch shape every attention layer saw
    attention = type(model.model.layers[0].self_attn)
    attend = attention._attend

    def spy(self, q, k, v, cu_seqlens, batch_shape, max_seqlen):
        batches.append(batch_shape)
        return attend(self, q, k, v, cu_seqlens, batch_shape, max_seqlen)

    monkeypatch.setattr(attention, "_attend", spy)
    runs = {}
    for path in ("batched", "varlen"):
        if path == "varlen":
            monkeypatch.setattr(hybrid, "common_length", lambda cu_seqlens: None)
        model.zero_grad()
        out = model(ids, cu_seqlens=cu, labels=ids)
        out.loss.backward()
        runs[path] = out, {n: p.grad.clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            assert model.model(ids, cu_seqlens=cu).cu_seqlens is cu
    layers = len(model.model.layers)
    assert batches == [(3, 40)] * 2 * layers + [None] * 2 * layers  # each path: training step, then model.model
    (batched, grads), (varlen, want) = runs["batched"], runs["varlen"]
    torch.testing.assert_close(batched.logits, varlen.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(batched.loss, varlen.loss, rtol=0, atol=1e-12)
    for n, g in grads.items():
        torch.testing.assert_close(g, want[n], rtol=0, atol=1e-11, msg=n)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_separate_runs(side):
    model = _model(kconv_size=3)
    lens, width = [23, 40, 9], 40
    ids, mask = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.long)
    rows = [_ids(1, n) for n in lens]
    for i, (row, n) in enumerate(zip(rows, lens)):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols], mask[i, cols] = row[0], 1
    tol = _rounding_scale(model, ids, attention_mask=mask)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, labels=ids).logits
        for i, (row, n) in enumerate(zip(rows, lens)):
            alone = model(row).logits[0]
            cols = slice(0, n) if side == "right" else slice(width - n, width)
            assert float((padded[i, cols] - alone).abs().max()) < tol
            # Padding repeats the last real token's prediction (generate() reads logits[:, -1]).
            assert float((padded[i, -1] - alone[-1]).abs().max()) < tol


def test_save_and_load_round_trip(tmp_path):
    model = _model(torch.float32, kconv_size=5, global_attn="moba")
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MoBAHybridConfig) and config.kconv_size == 5
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MoBAHybridForCausalLM)
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    ids = _ids(2, 30)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_generate_with_cache_equals_recomputing():
    """Greedy tokens from generate() (prefill + cached decode) equal recomputing the whole sequence at
    every step. MoBA routes sparsely here: 16-token blocks, topk 2, up to 60 tokens."""
    model = _model(kconv_size=3)
    prompt = _ids(2, 40)
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
        tokens = prompt
        for _ in range(20):
            tokens = torch.cat([tokens, model(tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)


def test_generate_on_a_padded_batch_equals_each_prompt_alone():
    model = _model(kconv_size=3)
    lens, width = [12, 30], 30
    ids, mask = torch.zeros(2, width, dtype=torch.long), torch.zeros(2, width, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, :n], mask[i, :n] = _ids(n), 1
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        for i, n in enumerate(lens):
            alone = model.generate(ids[i : i + 1, :n], max_new_tokens=12, do_sample=False, pad_token_id=0)
            assert torch.equal(batch[i, width:], alone[0, n:])


def test_reordered_cache_continues_the_reordered_sequences():
    """reorder_cache (beam search) keeps, repeats and permutes cached sequences, key-conv state included."""
    model = _model(kconv_size=3)
    ids, mask = _ids(3, 30), torch.ones(3, 30, dtype=torch.long)
    mask[1, 21:] = 0  # sequences of different lengths
    order = torch.tensor([2, 0, 0, 1])
    nxt = _ids(4, 1)
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        cache.reorder_cache(order)
        reordered_mask = torch.cat([mask[order], torch.ones(4, 1, dtype=torch.long)], 1)
        step = model(nxt, attention_mask=reordered_mask, past_key_values=cache).logits[:, -1]
        fresh = model(torch.cat([ids[order], nxt], 1), attention_mask=reordered_mask).logits[:, -1]
    assert float((step - fresh).abs().max()) < _rounding_scale(model, ids, attention_mask=mask)


@pytest.mark.parametrize("global_attn", ["moba", "dense"])
def test_cache_is_returned_and_continued(global_attn):
    model = _model(kconv_size=3, global_attn=global_attn)
    ids = _ids(2, 33)
    with torch.no_grad():
        first = model(ids[:, :25], use_cache=True)
        cache = first.past_key_values
        assert isinstance(cache, MoBAHybridCache) and cache.get_seq_length() == 25
        rest = model(ids[:, 25:], past_key_values=cache, use_cache=True)
        full = model(ids).logits
    tol = _rounding_scale(model, ids)
    assert float((torch.cat([first.logits, rest.logits], 1) - full).abs().max()) < tol
    assert cache.layers[1].seqlens.tolist() == [33, 33]
    # A MoBA layer decodes sparsely: its cache routes over block sums of the layer's block size.
    assert cache.layers[1].block_size == (model.config.moba_block_size if global_attn == "moba" else None)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _model(kconv_size=3).train()
    ids = _ids(2, 40)
    model(ids, labels=ids).loss.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], rtol=0, atol=1e-12, msg=name)


def test_bad_inputs():
    model = _model()
    ids = _ids(2, 10)
    with pytest.raises(ValueError, match="either cu_seqlens"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 10], dtype=torch.int32), attention_mask=torch.ones(1, 10))
    with pytest.raises(ValueError, match="packed as"):
        model(ids, cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(10)[None])
    with pytest.raises(TypeError, match="MoBAHybridCache"):
        model(ids, past_key_values=object())
    with pytest.raises(ValueError, match="labels must have the shape"):
        model(ids, labels=ids[:, :5])
