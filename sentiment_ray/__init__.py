"""sentiment-ray: fine-tune open LLMs into sentiment classifiers and label large datasets on Ray.

Importing the package is cheap: heavy libraries (torch, transformers, unsloth, ray) are
imported lazily inside the functions that need them.
"""

__version__ = "0.1.0"
