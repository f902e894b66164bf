"""Compute implementations of the msc ops (torch eager now; Triton and CUDA graphs later)."""
