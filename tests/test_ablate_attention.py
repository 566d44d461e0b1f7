"""benchmarks/ablate_attention.py: every variant's edit still matches the forward kernel's source once."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "ablate_attention.py"


def _variants():
    spec = importlib.util.spec_from_file_location("ablate_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VARIANTS


@pytest.mark.parametrize("name, edits", sorted(_variants().items()))
def test_edits_match_the_kernel_once(name, edits):
    source = (ROOT / "flashmoba" / "attention" / "forward.py").read_text()
    for old, new in edits:
        assert source.count(old) == 1, f"{name}: {old!r}"
        assert old != new
        source = source.replace(old, new)


_GQA_ERROR = """
import sys, torch, flashmoba
assert flashmoba.__file__.startswith(sys.argv[1]), flashmoba.__file__
torch.manual_seed(0)
cu = torch.tensor([0, 70, 103], dtype=torch.int32)
q, k, v = torch.randn(103, 4, 16), torch.randn(103, 1, 16), torch.randn(103, 1, 16)
kw = dict(block_size=16, topk=3)
out = flashmoba.moba_attn_varlen(q, k, v, cu, backend="triton", **kw)
ref = flashmoba.moba_attn_varlen(q.double(), k.double(), v.double(), cu, backend="reference", **kw)
print((out.double() - ref).abs().max().item())
"""


def _gqa_error(package_root: Path) -> float:
    """Max error against float64 of the float32 Triton forward (interpreter, GQA 4:1) of the package there."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(package_root), "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _GQA_ERROR, str(package_root)],
        cwd=package_root,  # "-c" puts the working directory first on sys.path
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return float(run.stdout.split()[-1])


def test_head_programs_variant_is_exact(tmp_path):
    """The design candidate "head-programs" computes MoBA attention: with GQA, under the interpreter, its
    error against float64 is at most twice the shipped kernel's on the same inputs (the other variants are
    wrong on purpose and are not checked)."""
    import shutil

    shutil.copytree(ROOT / "flashmoba", tmp_path / "flashmoba")
    forward = tmp_path / "flashmoba" / "attention" / "forward.py"
    source = forward.read_text()
    for old, new in _variants()["head-programs"]:
        source = source.replace(old, new)
    forward.write_text(source)
    shipped = _gqa_error(ROOT)
    assert 0 < shipped < 1e-4  # float32 rounding, not a broken kernel
    assert _gqa_error(tmp_path) <= 2 * shipped
