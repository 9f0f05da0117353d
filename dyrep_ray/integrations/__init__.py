"""DyRep inside training loops that dyrep-ray does not own (plain torchrun/DDP scripts, PyTorch Lightning).

:mod:`dyrep_ray.integrations.common` is pure torch; :mod:`dyrep_ray.integrations.lightning` needs the
``lightning`` extra (``pip install dyrep-ray[lightning]``) and is imported only when asked for.
"""
