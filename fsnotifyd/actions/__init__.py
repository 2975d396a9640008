"""Actions: the rules engine's decisions carried out as journaled, resumable jobs."""
