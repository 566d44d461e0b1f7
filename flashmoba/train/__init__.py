"""Training and evaluation of small hybrid MoBA language models.

* ``data``: the default corpus (this Python installation's source, one document per
  package, split by package) and user text (folder, jsonl, parquet, or a ``datasets`` name);
* ``tokenizer``: byte-level BPE trained locally, or plain bytes;
* ``packing``: documents packed into ``[1, N]`` rows with ``cu_seqlens``;
* ``needles``: synthetic key-value retrieval sequences (training mix and
  RULER-style S-NIAH-1/2/3 analogues);
* ``loop``: the training loop (AdamW, warmup + cosine, exact resume, DDP/FSDP2);
* ``evaluate`` and ``plots``: perplexity, retrieval, router SNR.

``flashmoba train`` / ``flashmoba eval`` (``cli_train.py``, ``cli_eval.py``) drive them.
"""
