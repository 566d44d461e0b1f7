"""The statistical model of MoBA routing (FlashMoBA section 3, appendix B): closed forms, a Monte-Carlo
check with the real router, and a measurement hook for trained models. ``flashmoba snr`` and
``flashmoba.theory.cli.demo_summary`` present them."""

from flashmoba.theory.measure import RouterSNR, measure_router_snr
from flashmoba.theory.simulate import RetrievalEstimate, RoutingScenario, simulate_retrieval
from flashmoba.theory.snr import (
    block_score_variance,
    effective_separation,
    failure_probability,
    required_snr,
    retrieval_probability,
    router_snr,
    snr_for_retrieval,
)

__all__ = [
    "block_score_variance",
    "effective_separation",
    "failure_probability",
    "required_snr",
    "retrieval_probability",
    "router_snr",
    "snr_for_retrieval",
    "RetrievalEstimate",
    "RoutingScenario",
    "simulate_retrieval",
    "RouterSNR",
    "measure_router_snr",
]
