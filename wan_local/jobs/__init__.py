"""The crash-safe job queue: a SQLite store and the worker process that runs jobs one at a time."""
