"""Data for training and evaluation, each stage a pure function of its inputs.

``corpus`` (text, identified by content hash) ─► ``tokenizer`` (byte, BPE, or a local Hugging Face one)
─► ``lm`` (packed token cache, resumable next-token batches); ``classify`` reads labelled rows
(TSV/CSV/JSONL) into padded classification batches. ``cache`` writes the files they derive.
"""
