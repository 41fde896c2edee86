"""Starting a run (login node): ``launch/run.py`` and ``sbatch``.

- ``cli``: the command-line front end behind ``launch/run.py``.
- ``launcher``: ``launcher=local``, worker processes on this machine.
- ``slurm``: sbatch rendering (``slurm.render``), submission, the job's own
  prepare step and the checked-in scripts (``python -m orchestrator.launch.slurm``).
- ``run_folder``: where a run's folder is and the files it starts with.
"""
