"""Choosing descriptors and networks without training hundreds of networks.

One concept per module: ``acsd`` (descriptor settings scored from data alone),
``naswot`` (architectures scored at initialisation), ``trials`` (a search's TOML and one
trained trial, resumable), ``study`` (Optuna TPE with a NASWOT pruner, SQLite storage) and
``orthogonal_array`` (OAT: strength-2 arrays and range analysis). The CLI is
``mlsurrogate hpo acsd|naswot|optuna|oat``; docs/hyperparameter-search.md has the measured
results on the project's aluminium data.
"""
