"""wan-local: Wan2.2 video generation on one consumer GPU.

Importing this package is cheap: no model is built, no device is touched.
"""

__version__ = "0.1.0"
