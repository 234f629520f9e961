"""Hyperparameter search on Ray Tune: one trial = one Ray Train run.

recipe        run_tune: prepare, run (or resume) the trials, finalize (table, plot, best/)
search_space  the `tune.search_space` of a config: validated, as Tune domains, per trial
scheduler     ASHA in training steps that keeps its rungs across restarts; trial histories
results       one row per trial, the best trial, the metric-vs-step plot
layout        the experiment folder's files
"""
