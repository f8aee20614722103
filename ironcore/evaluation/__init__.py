"""Evaluating checkpoints.

validation   a checkpoint's validation metrics on a data set, through its objective's own ``evaluate`` (``ironcore eval``)
"""
