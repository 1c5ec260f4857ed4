"""Training VAR's multi-scale tokenizer (:class:`mvar_dist.tokenizer.MultiScaleVQVAE`) with the
VQGAN recipe. The loss pieces are small modules of their own: pixel reconstruction, hinge
adversarial losses, VQGAN's adaptive weight and delayed start
(:mod:`mvar_dist.tokenizer_training.losses`), an LPIPS-style perceptual distance over VGG16
features read from weight files the user gives, never downloaded
(:mod:`mvar_dist.tokenizer_training.perceptual`), and the PatchGAN discriminator
(:mod:`mvar_dist.tokenizer_training.discriminator`); these three need only torch and
:mod:`mvar_dist.state_files`. Nothing is imported here, so importing one submodule does not load the others.
"""
