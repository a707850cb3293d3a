"""Pipeline stages over several GPUs or machines (see docs/CLUSTER.md).

* ``cluster_plan``: PURE planner, contiguous layer ranges over workers, balanced by predicted time;
* ``stage``: a Stage, an Engine that loads and runs only its range of layers;
* ``transport``: how the driver calls a stage (in-process threads, or a Ray actor);
* ``pipeline``: the driver, with the Engine's forward interface for ``generate_steps``.

Nothing here imports Ray at import time; only ``transport`` does, when a Ray worker is made.
"""
