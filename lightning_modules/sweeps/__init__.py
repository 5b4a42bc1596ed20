"""Sweeps: a YAML grid of ``run.py`` runs, their execution (local processes or SLURM) and report.

``grid`` reads a sweep file and expands it into named runs, ``state`` records what finished,
``executors`` runs them, ``protocol`` selects tuned values on validation only, and ``report``
turns the run directories into tables and plots. ``sweep.py`` is the command line.
"""
