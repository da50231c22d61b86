"""Kiln: bake golden images once, replace instances, never repair them in place."""

__version__ = "0.1.0"
__all__ = ["KilnError", "__version__"]

from kiln.errors import KilnError
