"""Exporting an adapter merged into its base (`sentiment-ray export`).

recipe   export_merged: load the base as the labeller does, fold the adapter in, save a plain HF folder
layout   the files it writes beside the weights
"""
