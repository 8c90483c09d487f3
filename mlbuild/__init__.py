"""mlbuild: a declarative, make-style build and deploy tool for ML model services.

This module is imported by the serving runtime inside every image, so it must stay
free of imports beyond the standard library.
"""

__version__ = "0.1.0"
