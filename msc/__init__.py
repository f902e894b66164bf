"""msc: a compiler for disaggregated Mixture-of-Experts inference."""
__version__ = "0.1.0"
