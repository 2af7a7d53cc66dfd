"""Running a trained model under a precision policy.

``load`` reads a jaxmp run or a Hugging Face directory and casts it for a policy; ``decode``
generates text with a preallocated KV cache; ``perplexity`` scores a text under several policies.
Reads runs through :class:`jaxmp.training.run_dir.RunDir`; never imports ``jaxmp.cli``.
"""
