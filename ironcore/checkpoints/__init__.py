"""Model weights on disk, in IronCore's format and HF's.

pointers     where a checkpoint is: run folders, ``latest`` and step folders resolved (no torch)
native       IronCore checkpoint folders: weights + model config, atomic writes, ``latest``, pruning
hf           HF checkpoint folders (config.json + safetensors): read and write weights
hf_families  one record per HF model family: config.json <-> ModelConfig, tensor names (no torch)
load         load_model / load_weights from any source: HF folder, IronCore checkpoint, run folder

Import the modules directly (``from ironcore.checkpoints.load import load_model``): this package
imports nothing itself, so the data side can resolve a checkpoint's tokenizer (``pointers``) and the
CLI can read an HF config.json (``hf_families``) without importing torch.
"""
