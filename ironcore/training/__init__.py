"""Training: the loop and what every objective shares.

trainer        the Trainer: set-up, the loop, validation, logging, signals
checkpointing  training checkpoints: save and resume exactly (optimizer, counters, RNGs)
optim          AdamW / SGD with weight-decay groups, the learning-rate schedule, clipping inside the step
tracking       MLflow, rank 0 only, batched, never fatal; run tags with the code version
perf           peak FLOP/s for MFU, and the host-allocator setting for CPU training
"""
