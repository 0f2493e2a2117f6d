"""Synthetic studies with known ground truth (demo, tests, benchmarks, training).

Not a runtime layer: nothing under net/, spool/, jobs/, ... imports it.
"""
