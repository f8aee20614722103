"""Model weights on disk, in IronCore's format and HF's.

native       IronCore checkpoint folders: weights + model config, atomic writes, ``latest``, pruning
hf           HF checkpoint folders (config.json + safetensors): read and write weights
hf_families  one record per HF model family: config.json <-> ModelConfig, tensor names (no torch)
load         load_model / load_weights from any source: HF folder, IronCore checkpoint, run folder

Import the modules directly (``from ironcore.checkpoints.load import load_model``): this package
imports nothing itself, so the config loader can read an HF config.json without importing torch.
"""
