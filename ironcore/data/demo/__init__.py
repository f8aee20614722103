"""Data to try the pipeline with (the offline corpus, synthetic tasks) and the inspection report."""
