"""The statistical model of MoBA routing: closed forms, a Monte-Carlo check with the real router,
and a measurement hook for trained models (FlashMoBA section 3, appendix B)."""

from flashmoba.theory.snr import (
    block_score_variance,
    effective_separation,
    failure_probability,
    required_snr,
    retrieval_probability,
    router_snr,
    snr_for_retrieval,
)
from flashmoba.theory.simulate import RetrievalEstimate, RoutingScenario, simulate_retrieval

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
]
