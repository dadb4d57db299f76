"""Training: the SFT and classifier loops around TRL and its levers, logs, checkpoints, resume and processes."""
