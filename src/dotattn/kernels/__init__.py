"""Compute backends. Each consumes a normalized :class:`dotattn.semantics.AttentionCall`."""
