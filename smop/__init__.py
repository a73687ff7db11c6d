"""SMoP: Sparse Mixture-of-Prompts and its relatives on frozen T5 models."""

__version__ = "0.1.0"
