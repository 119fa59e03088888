"""Benchmarks of mfa against MLX SDPA and naive attention (``python -m benchmarks.run``)."""
