"""The decode worker: pulls a prefilled request's leased KV (from another node's store through Ray
when the prefill ran elsewhere), joins it to its continuous batch, streams tokens, and publishes
the conversation's KV to its node's store for the next turn (``worker``)."""
