"""dyrep-ray benchmarks (``python -m bench``); see ``bench/__main__.py``.

Modules, one per measurement: ``dyrep_overhead`` (1), ``dbb_block`` (2), ``schedule`` (3 and 4),
``adjust`` (5), ``ray_overhead`` (6), ``data_path`` (7); ``common`` (interleaved timing, live-tensor
memory tracking, process group helper), ``sync_counter`` (host syncs / collectives), ``report`` (table).
"""
