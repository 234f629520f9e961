"""Evaluating predictions into a report (`sentiment-ray eval`).

recipe   evaluate_to_report: predictions or a tune experiment -> the one evaluation -> a report
layout   the files it writes
"""
