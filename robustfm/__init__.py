"""robustfm: robust fine-tuning and evaluation of vision foundation models on Ray.

Importing the package is cheap: ray, deepspeed, open_clip and mlflow are imported only where they are used.
"""

__version__ = "0.1.0"
