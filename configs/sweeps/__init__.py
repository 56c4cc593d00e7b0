"""Sweep files: `get_sweep()` returns the overrides of every trial (launch/sweep.py)."""
