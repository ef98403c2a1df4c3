"""Request logs: the Parquet format, validation, batching and converters from public data."""
