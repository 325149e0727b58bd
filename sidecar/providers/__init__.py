"""Cloud providers behind one neutral seam (see `base.py`); DigitalOcean is the one today.

The assigner speaks only `base`'s vocabulary (a holding, an operation, a handful of error
kinds), so a second cloud, or a second address family, is a new adapter here and no
change to the reconcile loop.
"""
