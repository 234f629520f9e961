"""Fine-tuning on Ray Train.

    recipe      the driver (run_training) and the worker function (train_worker), step by step
    data        labelled rows, the validation split, TRL's records
    trainer     SFTConfig, the SFTTrainer subclass, the report callback, checkpoint restore
    evaluation  validation scoring through the one evaluation
    layout      the run folder's files
"""
