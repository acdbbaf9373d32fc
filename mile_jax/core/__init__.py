"""The method and the step: losses, the decoder, attention kernels, sharding, optimizer, train step.

Pure computation over `jax.numpy` and Flax: nothing here reads files, parses
flags or knows about a run's directory.
"""
