"""Benchmarks: our backends side by side with what users pick instead (``reserved-kernels bench``)."""
