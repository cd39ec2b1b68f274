"""The global scheduler: the live Conductor (``conductor``) and its per-node view of the cache and the
workers' load (``view``), placement policies that both it and the discrete-event simulator run
(``policies``, ``mooncake``, ``goodput``), hot-block replication (``replication``), cost models and
their calibration, and the trace simulator (``simulator``)."""
