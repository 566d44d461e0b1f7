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
