"""The paper's hybrid MoBA language model as transformers classes, registered with the Auto* factories.

>>> from flashmoba.models import MoBAHybridConfig, MoBAHybridForCausalLM
>>> model = MoBAHybridForCausalLM(MoBAHybridConfig.from_preset("tiny", kconv_size=3))

Importing this package registers model type "moba_hybrid" with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(saved_dir)`` works after it.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from flashmoba.models.config import PRESETS, MoBAHybridConfig
from flashmoba.models.hybrid import (
    MoBAHybridCache,
    MoBAHybridForCausalLM,
    MoBAHybridModel,
    MoBAHybridModelOutput,
    MoBAHybridPreTrainedModel,
)

AutoConfig.register(MoBAHybridConfig.model_type, MoBAHybridConfig, exist_ok=True)
AutoModel.register(MoBAHybridConfig, MoBAHybridModel, exist_ok=True)
AutoModelForCausalLM.register(MoBAHybridConfig, MoBAHybridForCausalLM, exist_ok=True)

__all__ = [
    "PRESETS",
    "MoBAHybridCache",
    "MoBAHybridConfig",
    "MoBAHybridForCausalLM",
    "MoBAHybridModel",
    "MoBAHybridModelOutput",
    "MoBAHybridPreTrainedModel",
]
