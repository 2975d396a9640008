"""Virtual environments on images: the registry (which VE has which image and mount point) and
their life cycle (create, start, stop), shared by the CLI and the daemon."""
