"""clipcrawl's Spark stages: one thin module per stage plus the shared layer
(config, session, datasets, schemas, cli)."""

__version__ = "0.1.0"
