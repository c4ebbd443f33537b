"""The bench's parts, one module per group of rows."""
