"""Tensor- and data-parallel building blocks; every layer also works in one process.

setup          process groups from torchrun's env: init_parallel / destroy_parallel / ParallelContext
state          the current TP and DP groups and whether sequence parallelism is on (what layers ask)
comm           counted collectives (all-reduce, all-gather, reduce-scatter; rings of exchanges on gloo)
mappings       Megatron's copy / reduce / gather regions and the sequence-parallel ones, as autograd functions
layers         ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelOutput, vocab padding
cross_entropy  vocab-parallel cross-entropy (per-token losses)
sharding       TPSplit; full <-> sharded tensors, state dicts and optimizer states
grad           finalize_grads (TP sums + DP all-reduce), grad_norm, clip_factor

See docs/parallelism.md.
"""
