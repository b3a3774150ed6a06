"""Tiny ImageNet reading, sample data, packing/verifying shards, and the loaders."""
