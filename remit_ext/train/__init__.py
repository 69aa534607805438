"""The reference training loop: pretrain -> RL -> ReMiT mid-training (and its baselines) on an
embedded corpus of generated arithmetic, runnable as ``remit-ext flywheel``."""
