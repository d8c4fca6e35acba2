"""Independent reference implementations used by the test suite (not part of ds4jax).

``forward64``: float64 NumPy model of DeepSeek V4 Flash, ds4's CPU decode path
(MODEL.md §4.14), written from /work/shared/reference/MODEL.md and ds4.c only.
"""
