"""The host protocol the engine trains through, the standalone host for tests and the command line, and the
model classes of each family (one file per family), with their tokenizer, attention and checkpoint hashing."""
