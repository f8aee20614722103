"""Training: the loop and what every objective shares.

trainer        the Trainer: set-up, the loop, validation, logging, signals
checkpointing  training checkpoints: save and resume exactly (optimizer, counters, RNGs)
optimizer      the optimizer interface the loop steps (TrainingOptimizer) and plain DP's implementation
distributed_optimizer  flat buffers: ZeRO-1 sharding and bf16 master weights, the other implementation
optim          building the optimizer (AdamW / SGD with weight-decay groups), the learning-rate schedule
hooks          per-step hooks a model family needs (MoE: the aux-loss weight and the routing log, router_log)
memory         the memory plan and the measured bytes of weights, gradients and optimizer state
tracking       MLflow, rank 0 only, batched, never fatal; run tags with the code version
perf           peak FLOP/s for MFU, and the host-allocator setting for CPU training
"""
