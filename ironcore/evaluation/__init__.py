"""Evaluating checkpoints.

validation   validation loss and perplexity of a checkpoint on a data set (``ironcore eval``)
"""
