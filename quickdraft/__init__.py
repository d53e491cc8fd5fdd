"""QuickDraft: a lossless speculative-decoding proxy for agent workloads."""

__version__ = "0.1.0"
