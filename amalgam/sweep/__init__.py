"""Hyperparameter sweeps on Ray Tune over compact widths, balancing, joint lr and KD temperature.

- ``space``   : the job's ``sweep:`` section as a Ray Tune search space; width resolution
- ``prepare`` : the driver's one-off work (store extraction at the widest widths, calibration,
                hold-out split): everything trials share, so trials run no teacher
- ``trial``   : one trial = the engine's stages + joint stage from the store, reporting per epoch
- ``results`` : the trials table, the Pareto front (table + PNG) and ``best.yaml``
- ``driver``  : ``run_sweep``: prepare, Tuner (or Tuner.restore), results
"""
