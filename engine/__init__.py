"""shardtrain's engine: config, precision, optimizer, train state and steps, the training loop.

Importing it asks glibc for one malloc arena when JAX is about to start on one CPU device
(engine.hostmem: XLA:CPU's step temporaries then stay in the heap; SHARDTRAIN_KEEP_HOST_MEMORY=0
leaves glibc as it is)."""

from engine.hostmem import one_arena

one_arena()
