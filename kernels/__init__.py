"""Triton kernels of fastpeft, shipped inside the package as ``fastpeft.kernels``.

Importing this package needs triton; the backend in ``fastpeft.backends.triton`` imports it lazily.
"""
