"""preftune: Direct Preference Optimization, the whole loop."""
__version__ = "0.1.0"
