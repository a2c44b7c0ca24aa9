"""Slurm: one heterogeneous job per training (learners + SGLang fleet), rendered from `SlurmConfig`."""

from .config import SlurmConfig
from .render import render_sbatch
from .submit import job_state, slurm_submit, submit, wait_for

__all__ = ["SlurmConfig", "render_sbatch", "submit", "job_state", "wait_for", "slurm_submit"]
