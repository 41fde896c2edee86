"""A run's state on disk: checkpoints and weights.

- ``checkpoint``: save (committed atomically) and exact resume in the run directory.
- ``integrity``: every file's size and CRC-32, recorded at save, checked at resume.
- ``run_files``: where a run directory keeps its checkpoints (no torch).
- ``safe_load``: DeepSpeed's files read without running code from them.
- ``reshard``, ``reshard_source``: a checkpoint of one layout resumed under another.
- ``weights``, ``convert``, ``export``: layout-free weights, Meta and Hugging
  Face formats in and out.
"""
