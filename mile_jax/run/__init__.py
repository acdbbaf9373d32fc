"""What keeps a run alive: checkpoints, the workdir and its lock, signals, metrics,
profiling and joining a multi-process run."""
