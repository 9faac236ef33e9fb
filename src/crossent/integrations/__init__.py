"""Integrations with training frameworks.

``crossent.integrations.transformers``: one call makes a Hugging Face ``*ForCausalLM`` train
through :func:`crossent.linear_cross_entropy` (needs the ``transformers`` extra).
"""
