"""Frozen teachers (MVD, iBoot) and tokenizers (BEVT): built here, kept outside the engine."""
from .build import Teacher, build_teacher

__all__ = ["Teacher", "build_teacher"]
