"""Example phase hooks (docs/hooks.md); tests/test_phases.py runs each through a real proxy."""
