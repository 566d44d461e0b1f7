"""FlashMoBA routing in Triton: block centroids -> fused tiled top-k -> block -> query index.

``route_triton`` is imported lazily by ``flashmoba.api`` so that importing the package (and the
reference backend) never needs Triton.
"""

from flashmoba.routing.result import BlockIndex, BlockLayout, MoBARouting, block_layout, build_block_index


def __getattr__(name):
    if name == "route_triton":
        from flashmoba.routing.topk import route_triton

        return route_triton
    raise AttributeError(name)


__all__ = ["BlockIndex", "BlockLayout", "MoBARouting", "block_layout", "build_block_index", "route_triton"]
