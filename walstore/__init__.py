"""walstore: a replicated, durable event store on a write-ahead log."""

__version__ = "0.1.0"
