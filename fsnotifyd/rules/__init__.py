"""YAML remediation rules: schema, loader, compiler, engine (no I/O besides reading rule files)."""
