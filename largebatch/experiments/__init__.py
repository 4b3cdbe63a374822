"""Experiments whose results are committed under ``docs/``: run each with ``python -m largebatch.experiments.<name>``.

* :mod:`largebatch.experiments.batch_scaling`: steps to a target accuracy and final accuracy from
  batch 32 to 8192, for SGD, AdamW (each with and without its learning-rate rule), LARS, LAMB
  and Adan, on a synthetic teacher-student task generated on the fly.
"""
