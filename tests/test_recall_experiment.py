"""The associative-recall experiment (benchmarks/experiments/recall*.py): its data, its router metrics
against a float64 brute force, and the whole pipeline in --cpu-smoke mode (resume, report, usage errors)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

EXPERIMENTS = Path(__file__).parents[1] / "benchmarks" / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import recall  # noqa: E402
import recall_metrics  # noqa: E402
from recall_task import FILLER_TOKENS, TaskSpec, make_batch, text_bytes  # noqa: E402

from flashmoba.nn import MoBAAttention  # noqa: E402
from flashmoba.theory import retrieval_probability, router_snr  # noqa: E402

REQUIRED = (
    "variant",
    "seed",
    "block_size",
    "topk",
    "kconv",
    "tokens",
    "recall",
    "recall_by_distance",
    "router_recall",
    "router_chance",
    "snr_measured",
    "train_seconds",
)


def _text(n=20_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["def", "return", "self", "(x)", ":", "\n", "    ", "import", "numpy", "=", "+", "1"]
    return text_bytes([" ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g))])


@pytest.mark.parametrize(
    "spec",
    [
        TaskSpec(seq_len=4096),
        TaskSpec(seq_len=301, num_pairs=7, num_values=9, single_alphabet=50, multi_alphabet=3, key_lengths=(2, 3)),
        TaskSpec(seq_len=64, num_pairs=6, num_values=5, single_alphabet=6, multi_alphabet=2, key_lengths=(1, 4)),
        TaskSpec(seq_len=10, num_pairs=1, num_values=2, single_alphabet=1, multi_alphabet=2, key_lengths=(1,)),
    ],
)
def test_batches_hold_every_pair_once_and_queries_answer_from_the_context(spec):
    text = _text()
    num_seqs = 5
    batch = make_batch(spec, num_seqs, text, torch.Generator().manual_seed(3))
    tokens = batch.tokens
    assert tokens.shape == (num_seqs, spec.seq_len)
    assert int(tokens.min()) >= 0 and int(tokens.max()) < spec.vocab_size
    for s in range(num_seqs):
        row = tokens[s].tolist()
        keys = []
        for p in range(spec.num_pairs):
            length, a, v = int(batch.key_len[s, p]), int(batch.answer_pos[s, p]), int(batch.value_pos[s, p])
            assert length in spec.key_lengths
            assert v < a and batch.distance[s, p] == a - v
            key = row[a - length : a]
            assert row[v - length : v] == key, "the query repeats the context pair's key"
            assert row[a] == row[v] == int(batch.values[s, p])
            assert spec.value_base <= row[a] < spec.value_base + spec.num_values
            for j, token in enumerate(key):
                base = spec.single_base if length == 1 else spec.multi_base(length, j)
                size = spec.single_alphabet if length == 1 else spec.multi_alphabet
                assert base <= token < base + size, "key token from its slot's alphabet"
            keys.append(tuple(key))
        assert len(set(keys)) == spec.num_pairs, "keys are distinct within a sequence"
        # the query region is the queries back to back, right after the context
        query_start = spec.seq_len - sum(len(k) + 1 for k in keys)
        assert sorted(batch.answer_pos[s].tolist())[-1] == spec.seq_len - 1
        assert int(batch.answer_pos[s].min()) - int(batch.key_len[s, batch.answer_pos[s].argmin()]) == query_start
        assert int(batch.value_pos[s].max()) < query_start
        # filler: bytes, and in order a contiguous window of the text stream
        filler = [t for t in row if t < FILLER_TOKENS]
        assert len(filler) == spec.seq_len - 2 * (spec.seq_len - query_start)
        stream = text.tolist()
        if filler:
            starts = [i for i in range(len(stream) - len(filler) + 1) if stream[i : i + len(filler)] == filler]
            assert starts, "the filler is one window of the text"
        is_text = tokens[s] < FILLER_TOKENS
        assert torch.equal(batch.text_mask[s, :-1], is_text[:-1] & is_text[1:]) and not batch.text_mask[s, -1]


def test_batches_are_a_function_of_the_generator():
    spec, text = TaskSpec(seq_len=512, num_pairs=16), _text()
    a, b = (make_batch(spec, 3, text, torch.Generator().manual_seed(7)) for _ in range(2))
    c = make_batch(spec, 3, text, torch.Generator().manual_seed(8))
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in vars(a))
    assert not torch.equal(a.tokens, c.tokens)


def test_multi_token_keys_need_the_whole_tuple():
    """With 128 pairs of 2-token keys from 16-token slot alphabets, most single key tokens occur in
    several pairs of a sequence: one token does not identify its pair."""
    spec = TaskSpec(seq_len=4096, num_pairs=128, key_lengths=(2,))
    batch = make_batch(spec, 4, _text(), torch.Generator().manual_seed(0))
    for s in range(4):
        first = batch.tokens[s, batch.value_pos[s] - 2]
        _, counts = torch.unique(first, return_counts=True)
        assert (counts > 1).float().mean() > 0.9


def test_task_refuses_what_cannot_be_built():
    with pytest.raises(ValueError, match="key_lengths"):
        TaskSpec(key_lengths=(5,))
    with pytest.raises(ValueError, match="does not fit"):
        TaskSpec(seq_len=100, num_pairs=20)
    with pytest.raises(ValueError, match="distinct keys"):
        TaskSpec(seq_len=4096, num_pairs=20, multi_alphabet=4, key_lengths=(2,))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        make_batch(TaskSpec(seq_len=512, num_pairs=8), 1, _text(10), torch.Generator())


def test_curriculum_keeps_the_tokens_of_every_step():
    setup = dict(recall.GPU_SETUP, steps=11, curriculum=[[0.2, 8], [0.3, 2], [0.5, 1]])
    phases = recall.curriculum(setup)
    assert len(phases) == 11 and phases[0] == 8 and phases[-1] == 1 and phases == sorted(phases, reverse=True)
    for divisor in set(phases):
        spec = recall.task_spec(setup, divisor)
        assert spec.seq_len * divisor == setup["seq_len"]
        assert spec.num_pairs * divisor == setup["num_pairs"]
    assert recall.curriculum(dict(setup, curriculum=[])) == [1] * 11


def test_wilson_interval_is_the_librarys():
    assert recall_metrics.wilson(0, 10)[0] == 0.0 and recall_metrics.wilson(10, 10)[1] == 1.0
    low, high = recall_metrics.wilson(30, 100)
    assert low < 0.3 < high and recall_metrics.wilson(0, 0) is None


def _brute_force_router(layer, hidden, batch):
    """Router recall, chance and SNR sums by explicit loops in float64 (the definitions of recall_metrics)."""
    q, k = layer.qk(hidden)
    num_seqs, seq_len = hidden.shape[:2]
    q, k = q.view(num_seqs, seq_len, layer.num_heads, -1), k.view(num_seqs, seq_len, layer.num_kv_heads, -1)
    bs, topk, group = layer.block_size, layer.topk, layer.num_heads // layer.num_kv_heads
    hits = rows = queries = 0
    chance = dme = var = 0.0
    past_blocks = []
    for s in range(num_seqs):
        for a, v in zip(batch.answer_pos[s].tolist(), batch.value_pos[s].tolist()):
            t, n = v // bs, (a - 1) // bs
            if t >= n:
                continue
            queries += 1
            past_blocks.append(n)
            chance += min(1.0, (topk - 1) / n)
            for h in range(layer.num_heads):
                qv, keys = q[s, a - 1, h], k[s, : n * bs, h // group]
                scores = [float(qv @ keys[b * bs : (b + 1) * bs].mean(0)) for b in range(n)]
                best = sorted(range(n), key=lambda b: -scores[b])[: topk - 1]
                hits += t in best
                dots = (keys @ qv).tolist()
                noise = [x for u, x in enumerate(dots) if u // bs != t]
                mu = sum(noise) / len(noise)
                var += sum((x - mu) ** 2 for x in noise) / (len(noise) - 1)
                dme += sum(dots[t * bs : (t + 1) * bs]) - bs * mu
                rows += 1
    return dict(
        recall=hits / rows, chance=chance / queries, dme=dme / rows, var=var / rows, queries=queries, past=past_blocks
    )


@pytest.mark.parametrize("block_size, topk, heads, kv_heads", [(8, 3, 2, 1), (5, 2, 3, 3), (16, 4, 4, 2)])
def test_router_metrics_match_a_float64_brute_force(block_size, topk, heads, kv_heads):
    spec = TaskSpec(seq_len=160, num_pairs=6, num_values=7, single_alphabet=20, multi_alphabet=3)
    batch = make_batch(spec, 3, _text(), torch.Generator().manual_seed(block_size))
    layer = MoBAAttention(24, heads, kv_heads, 8, attn_type="moba", block_size=block_size, topk=topk)
    layer = layer.double().eval()
    hidden = torch.randn(3, spec.seq_len, 24, dtype=torch.float64)
    with torch.no_grad():
        sums = recall_metrics._router_sums(layer, hidden, batch, torch.autocast("cpu", enabled=False))
        got = recall_metrics._router_finish([sums])
        want = _brute_force_router(layer, hidden, batch)
    assert want["queries"] > 0 and got["queries"] == want["queries"]
    assert got["router_recall"] == pytest.approx(want["recall"], abs=1e-12)
    assert got["router_chance"] == pytest.approx(want["chance"], rel=1e-12)
    assert got["delta_mu_eff"] == pytest.approx(want["dme"], rel=1e-9)
    assert got["noise_variance"] == pytest.approx(want["var"], rel=1e-9)
    assert got["snr"] == pytest.approx(router_snr(want["dme"], block_size, noise_variance=want["var"]), rel=1e-9)
    predicted = sum(retrieval_probability(got["snr"], n, topk - 1) for n in want["past"]) / len(want["past"])
    assert got["predicted_router_recall"] == pytest.approx(predicted, rel=1e-9)
    # pooling two batches weights them by their queries
    pooled = recall_metrics._router_finish([sums, sums])
    assert pooled["router_recall"] == pytest.approx(got["router_recall"]) and pooled["queries"] == 2 * got["queries"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("recall")
    assert recall.main(["--cpu-smoke", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_cpu_smoke_writes_every_record_and_the_report(smoke):
    out, results = smoke
    runs = results["runs"]
    assert [r["variant"] for r in runs] == list(recall.GRID)
    setup = results["setups"][runs[0]["setup_id"]]
    for r in runs:
        assert all(key in r for key in REQUIRED)
        assert 0 <= r["recall"] <= 1 and r["total"] == setup["eval_seqs"] * setup["num_pairs"]
        buckets = r["recall_by_distance"]
        assert sum(b["total"] for b in buckets) == r["total"] and sum(b["correct"] for b in buckets) == r["correct"]
        assert buckets[0]["lo"] == 0 and buckets[-1]["hi"] == setup["seq_len"]
        assert r["tokens"] == setup["steps"] * setup["batch_seqs"] * setup["seq_len"]
        moba = recall.VARIANTS[r["variant"]][0] == "moba"
        assert (r["router_recall"] is not None) == moba and (r["snr_measured"] is not None) == moba
        if moba:
            assert 0 <= r["router_recall"] <= 1 and 0 < r["router_chance"] <= 1
            assert r["block_size"] * r["topk"] == 1024 // setup["block_scale"]
        assert math.isfinite(r["perplexity"]["ppl"])
        # the key convolution starts at zero and is not decayed: after training its weights have moved
        assert (len(r["kconv_weights"]) == 1) == bool(r["kconv"])
        assert all(w["norm"] > 0 for w in r["kconv_weights"])
    sources = {(s["source"], s["variant"]) for s in results["switch"]}
    assert sources == {(src, dst) for src, dsts in recall.SWITCH.items() for dst in dsts}
    for name in ("results.md", "recall_vs_block.png", "router_vs_snr.png", "switch_vs_block.png"):
        assert (out / name).stat().st_size > 0
    assert "Training-free switch" in (out / "results.md").read_text()


def test_resume_skips_finished_runs(smoke, tmp_path):
    out, results = smoke
    assert recall.main(["--cpu-smoke", "--out", str(tmp_path), "--resume", str(out / "results.json")]) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["runs"] == results["runs"] and again["switch"] == results["switch"]


def test_report_of_several_files_keeps_one_copy_of_each_run(smoke, tmp_path):
    out, results = smoke
    assert recall.main(["--out", str(tmp_path), "--report", str(out / "results.json"), str(out / "results.json")]) == 0
    merged = json.loads((tmp_path / "results.json").read_text())
    assert merged["runs"] == results["runs"] and merged["switch"] == results["switch"]
    per_run = (tmp_path / "results.md").read_text().split("## Per run")[1].split("\n## ")[0]
    assert per_run.count("| dense | 0 |") == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "nope=1"], "--set takes KEY=VALUE"),
        (["--set", "lr=fast"], "must be JSON"),
        (["--set", "num_pairs=100000"], "does not fit"),
        (["--resume", "missing.json"], "no such file"),
        (["--seeds", "-1"], "must be >= 0"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert recall.main(["--cpu-smoke", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists(), "nothing is written before a refusal"


def test_out_must_be_a_folder(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep")
    assert recall.main(["--cpu-smoke", "--out", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err and target.read_text() == "keep"


@pytest.mark.parametrize("layer_index", [0, 1])
def test_ablation_attention_probs_reproduce_the_layer(layer_index):
    """recall_ablate.attention_probs, applied to the layer's values, gives the layer's own output (the
    sliding-window layer with RoPE and its window, the global dense layer over all past keys)."""
    import recall_ablate

    setup = dict(recall.CPU_SMOKE, seq_len=40, num_pairs=2, swa_window=8)
    torch.manual_seed(0)
    model = recall.MoBAHybridForCausalLM(recall.model_config("dense", setup, "reference"))
    for p in model.parameters():  # away from the zero-mean init, so that a wrong mask or scale shows
        p.data.normal_(0, 0.3)
    layer = model.model.layers[layer_index]
    attn = layer.self_attn
    x = layer.input_layernorm(torch.randn(2, 40, setup["hidden_size"]))
    window = setup["swa_window"] if layer_index == 0 else None
    probs = recall_ablate.attention_probs(attn, x, window)
    assert probs.shape == (2, attn.num_heads, 40, 40)
    v = attn.v_proj(x).view(2, 40, attn.num_heads, -1).transpose(1, 2)
    mixed = (probs @ v).transpose(1, 2).reshape(2, 40, -1)
    torch.testing.assert_close(attn.o_proj(mixed), attn(x), atol=1e-5, rtol=1e-4)
    if window:
        assert float(probs[:, :, 20, : 20 - window + 1].detach().abs().max()) == 0.0  # outside the window
