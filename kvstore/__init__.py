"""The KV-cache-centric store: chained block keys (``keys``), the prefix index with token-granular and
window-aware matching (``index``), block bytes (``blocks``), host and disk tiers (``tiers``), leases,
events, and the store itself (``store``), run as one Ray actor per node (``actor``) whose blocks live
in Ray's object store and move between nodes through it."""
