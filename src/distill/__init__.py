"""distill: specialize a small model by distilling a teacher, as one cached, resumable pipeline."""

__version__ = "0.1.0"
