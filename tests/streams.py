"""Reading many cluster streams at once, for the fault tests."""


def stream_all(cluster, subs, on_first=None) -> list[list[int]]:
    """Every submission's tokens; ``on_first()`` runs once each stream has given its first output
    (so a fault lands while all of them are in flight)."""
    streams = [cluster.stream(s) for s in subs]
    got = [list(next(st).token_ids) for st in streams]
    if on_first is not None:
        on_first()
    for g, st in zip(got, streams):
        for out in st:
            g.extend(out.token_ids)
    return got
