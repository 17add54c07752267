"""Training: state, optimizer, jitted step, checkpoints, metrics and the loop."""
