"""jobsyncd: an offline-first sync agent for jobs.

The package is laid out by concern: cli -> (store, sync) -> (store, remote); see README.md.
"""

__version__ = "0.1.0"
