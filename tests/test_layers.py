"""The package's import graph reads top to bottom: no module imports one of a higher layer.

Layers, from the ground up (a module may import its own layer's modules and any lower layer):

    0  _checks, configs        validation, tile configs
    1  reference               the naive definition (the oracle)
    2  routing                 centroids, top-k, block index
    3  attention               the attention kernels
    4  api, decode             the public functions (prefill; decode over the cache)
    5  flashmoba (__init__)    the public names
    6  nn, theory              layers built on the public functions; the SNR model
    7  models, integrations,   the hybrid model; transformers integration;
       distributed             context parallelism (the ops, and a model's attention layers)
    8  train                   data, training loop, evaluation
    9  demo, cli               the command line

Backends never import each other: the reference imports no kernel, the kernels import no reference.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "flashmoba"
LAYERS = {
    "_checks": 0,
    "configs": 0,
    "reference": 1,
    "routing": 2,
    "attention": 3,
    "api": 4,
    "decode": 4,
    "__init__": 5,
    "nn": 6,
    "theory": 6,
    "models": 7,
    "integrations": 7,
    "distributed": 7,
    "train": 8,
    "demo": 9,
    "cli": 9,
}
# (importer, imported) pairs that the layers allow but the house forbids: backends never import each other.
FORBIDDEN = {("attention", "reference"), ("routing", "reference")}


def _unit(module: str) -> str:
    """``flashmoba.routing.topk`` -> ``routing``; ``flashmoba`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _edges():
    """(importer file, importer unit, imported unit) for every flashmoba import, at any depth of the code."""
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        source = _unit(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("flashmoba"):
                if node.module == "flashmoba":  # from flashmoba import x: a subpackage, or a public name
                    targets = [a.name if a.name in LAYERS else "__init__" for a in node.names]
                else:
                    targets = [_unit(node.module)]
            elif isinstance(node, ast.Import):
                targets = [_unit(a.name) for a in node.names if a.name.split(".")[0] == "flashmoba"]
            else:
                continue
            for target in targets:
                if target != source:
                    yield path.relative_to(PACKAGE.parent), source, target


def test_every_unit_has_a_layer():
    units = {
        _unit(".".join(("flashmoba", p.relative_to(PACKAGE).with_suffix("").parts[0])))
        for p in PACKAGE.glob("*")
        if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    assert units - set(LAYERS) == set(), "give every new module or subpackage a layer in LAYERS"


@pytest.mark.parametrize("path, source, target", sorted(set(_edges())), ids=lambda x: str(x))
def test_imports_point_down(path, source, target):
    assert LAYERS[target] <= LAYERS[source], (
        f"{path}: {source} (layer {LAYERS[source]}) imports {target} (layer {LAYERS[target]})"
    )
    assert (source, target) not in FORBIDDEN, f"{path}: backends never import each other ({source} -> {target})"
