"""Parallelism applied to a single-device model from outside (torchtitan style): one plan per file."""
