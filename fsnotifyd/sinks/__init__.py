"""Where events go: the journal, stdout, the unix socket, metrics."""
