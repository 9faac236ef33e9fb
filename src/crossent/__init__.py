"""crossent: the cross-entropy family of losses with exact PyTorch semantics."""

__version__ = "0.1.0"
