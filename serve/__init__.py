"""Triton serving, online and batch clients, onnxruntime fallback, drift monitoring and rollouts.

This package must import without torch or Lightning: it runs in lean serving containers and shares
only the torch-free :mod:`medops` package with training.
"""
