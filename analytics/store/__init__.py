"""Storage backends behind one interface (:class:`analytics.store.base.Store`)."""
