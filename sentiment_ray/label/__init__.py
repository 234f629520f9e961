"""Offline labelling on Ray Data.

recipe   label_dataset: plan, label the pending units on Ray Data, merge and evaluate
plan     work units, the duplicate-ID check, the manifest a rerun is checked against
labeler  the actor: a unit's rows read, validated, scored and committed
outputs  markers, merged submission / quarantine, the evaluation
layout   the output folder's files
"""
