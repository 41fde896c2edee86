"""Planning a run before anything starts (pure; runs on the login node).

- ``plan``: layout resolution and the cross-section rules;
  ``Plan`` is the resolved run (layout, stages, padded vocabulary, precision).
- ``search``: ``parallel=auto``, every valid layout estimated and ranked.
- ``precision``: the precision policy, the one place its rules are written.
- ``ds_config``: the DeepSpeed JSON, a pure function of the plan and two config sections.
- ``perf``: the estimate of a layout: time per step, throughput, MFU, and
  ``memory`` (model state and activations per device, as DeepSpeed and autograd hold them).
- ``plan_view``: what the cost models read of a plan (a ``Protocol``).
- ``flops``: training FLOPs per token and MFU.
- ``cpu_costs``, ``cpu_probe``: what a CPU host measures for the time model,
  kept per host by ``host_cache``;
  ``cpu_allocator``: the malloc CPU ranks run under (tcmalloc, found and checked
  before launch, preloaded by the worker).
"""
