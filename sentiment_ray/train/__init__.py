"""Fine-tuning on Ray Train.

recipe      the driver (run_training) and the worker function (train_worker), step by step
data        labelled rows, the validation split, TRL's records
trainer     SFTConfig, the SFTTrainer subclass, the report callback, checkpoint restore
evaluation  validation scoring through the one evaluation
layout      the run folder's files
preflight   the driver's checks of model and data before Ray starts
progress    the steps as events for the driver's progress bar (a TrainerCallback);
            what a person sees of them is sentiment_ray/terminal/training.py
"""
