"""The trainer: losses, optimizer, state and shardings, jitted steps, checkpoints, logging."""
