"""Benchmarks of streamrec (see bench/README.md). Results go to bench/results/."""
