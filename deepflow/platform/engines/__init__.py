"""Training engines: one small interface, three implementations."""
