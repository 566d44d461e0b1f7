"""Training and evaluation of small hybrid MoBA language models.

* :mod:`~flashmoba.train.data`: the default corpus (this Python installation's source, one document per
  package, split by package) and user text (folder, jsonl, parquet, or a ``datasets`` name);
* :mod:`~flashmoba.train.tokenizer`: byte-level BPE trained locally, or plain bytes;
* :mod:`~flashmoba.train.packing`: documents packed into ``[1, N]`` rows with ``cu_seqlens``;
* :mod:`~flashmoba.train.needles`: synthetic key-value retrieval sequences (training mix and
  RULER-style S-NIAH-1/2/3 analogues);
* :mod:`~flashmoba.train.loop`: the training loop (AdamW, warmup + cosine, exact resume, DDP/FSDP2);
* :mod:`~flashmoba.train.evaluate` and :mod:`~flashmoba.train.plots`: perplexity, retrieval, router SNR.

``flashmoba train`` / ``flashmoba eval`` (``cli_train.py``, ``cli_eval.py``) drive them.
"""
