"""The model: one TransformerModel configured by ModelConfig."""

from ironcore.models.transformer import TransformerModel

__all__ = ["TransformerModel"]
