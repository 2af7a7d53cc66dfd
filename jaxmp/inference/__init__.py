"""Running a trained model under a precision policy.

``load`` reads a jaxmp run or a Hugging Face directory and casts it for a policy; ``decode``
generates text with a preallocated KV cache; ``perplexity`` scores a text under several policies;
``classify`` streams labelled or unlabelled rows through a fine-tuned sequence classifier.
Reads runs through :class:`jaxmp.training.run_dir.RunDir`; never imports ``jaxmp.cli``.
"""
