"""benchmarks/compile_stats.py: the engine's kernels compile for GPUs this machine does not have, and the
tiles of the default table fit the shared memory of the architectures with the least of it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "compile_stats.py"
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
KERNELS = {
    "_block_centroids_kernel",
    "_route_topk_kernel",
    "_attn_fwd_row_ref_kernel",
    "_attn_fwd_kernel",
    "_attn_fwd_prepare_rescue_kernel",
    "_attn_fwd_finalize_kernel",
    "_attn_bwd_delta_kernel",
    "_attn_bwd_kernel",
    "_decode_attend_kernel",
    "_decode_combine_kernel",
}


def _run(*args, interpret="0"):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_INTERPRET": interpret}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton has no bundled ptxas")
def test_default_tiles_fit_the_smallest_shared_memory(tmp_path):
    """sm86 and sm120 allow 99 KB of shared memory per block: every kernel of the engine, in the tiles that
    ``flashmoba.configs`` gives those GPUs, compiles and fits (``--check`` fails otherwise)."""
    out = tmp_path / "stats.json"
    run = _run("--archs", "86", "120", "--configs", "64:16", "--dim", "128", "--check", "--out", str(out))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    for arch in ("sm86", "sm120"):
        mine = [r for r in rows if r["arch"] == arch]
        assert {r["kernel"] for r in mine} == KERNELS
        for r in mine:
            assert 0 < r["regs"] <= 255 and 0 <= r["shared"] <= r["shared_limit"] == 101376
            assert r["spill_stores"] >= 0 and r["stack"] >= 0


def test_usage_errors_are_one_line():
    for args, message in (
        (("--archs", "75"), "--archs [75]"),
        (("--configs", "64x16"), "--configs takes block:topk"),
        (("--heads", "6", "--kv-heads", "4"), "multiple of --kv-heads"),
    ):
        run = _run(*args)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
    run = _run("--archs", "90", interpret="1")
    assert run.returncode == 2 and "unset TRITON_INTERPRET" in run.stderr
