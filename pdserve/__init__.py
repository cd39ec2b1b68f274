"""pdserve: the glue users touch (CLI, cluster launch, gateway, metrics)."""
