"""Capture: a model (zoo name, Hugging Face config, factory) on the meta device, traced with make_fx
on fake tensors whose named dimensions are symbols; what the trace assumed (guards, limits); the
custom ops that keep attention and experts whole; the paths eager takes where values decide."""
