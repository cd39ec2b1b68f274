"""The prefill worker: loads a request's cached prefix (its node's store first, another node's when
placed so), computes the rest with the engine, samples the first token, publishes the prompt's KV
to its node's store and leases it to the decode worker (``worker``)."""
