"""Training: the one run lifecycle every task plugs into (lifecycle.py), with what it shares: TRL arguments, speed
levers, the training log, sealed checkpoints, exact resume, signals, faults, divergence, processes and launching."""
