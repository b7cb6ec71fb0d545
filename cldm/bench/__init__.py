"""Benchmark machinery: our model beside diffusers on the same weights, timed and measured (the scripts in
benchmarks/ are its command lines)."""
