"""Training with DeepSpeed: the engine, the schedules, one step, checkpoints that resume
exactly, the loop on each rank, periodic evaluation, and the export of a finished run."""
