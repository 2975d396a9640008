"""The daemon's composition root: the only place concrete parts are wired together."""
