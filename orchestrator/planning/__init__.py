"""Planning a run before anything starts (pure; runs on the login node).

- ``plan``: layout resolution and the cross-section rules, and ``parallel=auto``.
- ``perf``: memory per device and time per step of a layout.
- ``plan_view``: what the cost models read of a plan (a ``Protocol``).
- ``flops``: training FLOPs per token and MFU.
- ``cpu_costs``, ``cpu_probe``: what a CPU host measures for the time model.
"""
