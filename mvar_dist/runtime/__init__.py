"""The training runtime both trainers share: the run skeleton (:func:`mvar_dist.runtime.loop.run_training`)
with its step loop and policies, the interface a kind of training implements
(:class:`mvar_dist.runtime.task.TrainingTask`), checkpoints that resume exactly, the rank
environment, the DeepSpeed engine, the run-directory lock and safe loading. Nothing is imported
here, so importing one module does not load DeepSpeed."""
