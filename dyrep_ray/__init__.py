"""dyrep-ray: DyRep dynamic re-parameterization on Ray Train / Ray Tune."""

__version__ = "0.1.0"
