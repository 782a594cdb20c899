"""Backend kernels: plain-PyTorch references (reference.py) and Triton kernels (triton/)."""
