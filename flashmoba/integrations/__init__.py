"""Integrations with other libraries; each is imported explicitly, so flashmoba never needs them.

* ``flashmoba.integrations.transformers``: ``attn_implementation="moba"`` for Hugging Face models.
"""
