"""Launching: local ranks (``--nproc``), SLURM through submitit (``submit``, ``submit-prep``),
what runs inside a job (rendezvous, training, requeue), and the status of a submitted run."""
