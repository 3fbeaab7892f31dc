"""shardtrain's engine: config, precision, optimizer, train state and steps, the training loop."""
