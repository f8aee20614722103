"""Tensor- and data-parallel building blocks; every layer also works in one process."""
