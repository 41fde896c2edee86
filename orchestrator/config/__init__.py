"""The run's configuration: what the user writes, typed and checked.

- ``schema``: the dataclass schema registered with Hydra's ConfigStore (``Config``).
- ``model``, ``cluster``: the model and cluster/SLURM sections.
- ``rules``: the allowed choices and field checks the sections share.
- ``pretrained``: ``model.init_from``, the architecture a checkpoint states.
- ``compose``: ``conf/`` plus overrides to a ``Config``, and one line per error.

Built once and never mutated afterwards; the resolved run is ``planning.plan``.
"""
