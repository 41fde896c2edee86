"""Megatron-style model parallelism for LLaMA: rank layout, process groups,
tensor-parallel layers, vocab-parallel cross entropy and the LLaMA model.

Process groups are passed in, never global: build a `ProcessGroups` once and
hand it to every layer. With tp=1 and no process group the model builds and
runs in a single process.
"""
