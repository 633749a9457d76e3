"""The benchmark suite: edgeproxy side by side with nginx and HAProxy on one machine.

Run it from the repository top with ``python -m bench``; docs/bench.md says
what it measures and how to read the numbers.
"""
