"""The run directory, torch-free and Ray-free: what its files are called, where it lives, what its files hold,
which checkpoints are ours, who may write it.

* ``layout``: every file and directory name dyrep-ray writes.
* ``storage``: a run on a local directory or an object-store prefix (pyarrow file systems).
* ``files``: the typed run files (an epoch's metrics line, a checkpoint's ``meta.json``).
* ``checkpoints``: which directories are the run's checkpoints, their order, their meta.
* ``lock``: safe run names, refusing foreign directories, the writer lock.

The CLI's ``report``/``compare`` paths and config checks import only this package, so none of its modules may
import torch or Ray (tests/test_rundir_torch_free.py checks it).
"""
