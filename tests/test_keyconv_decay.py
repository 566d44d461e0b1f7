"""The key convolution starts as the identity, learns from the first step, and is never weight-decayed."""

import torch

from flashmoba.models import MoBAHybridConfig, MoBAHybridForCausalLM
from flashmoba.nn import KeyConv
from flashmoba.train.loop import TrainConfig, make_optimizer

VOCAB = 48


def kconv_model(kconv_size=3):
    config = MoBAHybridConfig.from_preset(
        "tiny",
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        intermediate_size=64,
        swa_window=8,
        moba_block_size=8,
        moba_topk=2,
        kconv_size=kconv_size,
        attn_backend="reference",
    )
    return MoBAHybridForCausalLM(config)


def _kconv_params(model):
    return [p for m in model.modules() if isinstance(m, KeyConv) for p in m.parameters()]


def test_optimizer_puts_key_conv_in_the_no_decay_group():
    model = kconv_model()
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    kconv = {id(p) for p in _kconv_params(model)}
    assert kconv and kconv <= decay[0.0]
    assert id(model.model.layers[1].self_attn.q_proj.weight) in decay[0.1]
    assert id(model.model.norm.weight) in decay[0.0]
    # every trainable parameter in exactly one group
    assert sorted(decay[0.0] | decay[0.1]) == sorted(id(p) for p in model.parameters())
    assert not decay[0.0] & decay[0.1]


def test_key_conv_weights_keep_their_value_without_gradient():
    """With zero gradients AdamW moves a parameter only through its decay: the key convolution keeps its
    learned weights while a projection shrinks by exactly (1 - lr * weight_decay)."""
    model = kconv_model()
    conv = model.model.layers[1].self_attn.key_conv
    proj = model.model.layers[1].self_attn.k_proj
    with torch.no_grad():
        conv.weight.copy_(torch.randn_like(conv.weight))
    before_conv, before_proj = conv.weight.detach().clone(), proj.weight.detach().clone()
    config = TrainConfig(lr=0.05, weight_decay=0.1)
    optimizer = make_optimizer(model, config)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.equal(conv.weight, before_conv)
    torch.testing.assert_close(proj.weight, before_proj * (1 - config.lr * config.weight_decay))


def test_key_conv_learns_from_its_zero_init():
    """A fresh key convolution is the identity (same logits as without one) and its weights move in training."""
    torch.manual_seed(0)
    plain = kconv_model(kconv_size=0)
    model = kconv_model()
    missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all("key_conv" in name for name in missing)
    ids = torch.randint(0, VOCAB, (2, 40))
    torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=0)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for p in _kconv_params(model):
        assert p.abs().min() > 0, "every key-convolution weight moved away from zero"
