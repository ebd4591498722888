"""raro-fast: RARO training from expert demonstrations."""
__version__ = "0.1.0"
