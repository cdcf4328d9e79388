"""FocusDPO: adaptive-focus preference post-training for multi-subject personalized image generators.

See DESIGN (README) for the method; the stable library API lives in :mod:`focusdpo.focus` and
:mod:`focusdpo.losses`.
"""

__version__ = "0.1.0"
