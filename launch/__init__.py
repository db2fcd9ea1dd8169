"""Launchers: SLURM jobs with requeue, multi-node torchrun, data-prep arrays."""
