"""Top-down inference in CNNs: pure PyTorch algorithms (no Lightning import here)."""

__version__ = "0.1.0"
