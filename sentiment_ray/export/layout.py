"""The file export writes beside the merged weights: what the model was fine-tuned for
(base, adapter, dtype, prompt, label set, temperature)."""

EXPORT_INFO_FILE = "sentiment_ray_export.json"
