"""Usage events -> session deltas: turns, once-only keys, pricing, aggregation. Pure."""
