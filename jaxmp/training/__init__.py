"""Training runs: what ``python -m jaxmp.train`` and ``jaxmp.compare`` do, as a library.

``config`` (``TrainConfig``: every setting, checked by itself) ─► ``tasks`` (model, params, data and
loss for ``lm`` or ``classify``) ─► ``loop.run`` (state, mesh, signals, checkpoints, the step loop)
─► ``run_dir`` (the sole reader and writer of a run's files) and ``metrics_log`` (the logging
window, progress, ``metrics.jsonl``, TensorBoard, W&B, the summary). ``compare`` runs one config
under several policies. Messages name settings by field (```seq_len```); never imports ``jaxmp.cli``.
"""
