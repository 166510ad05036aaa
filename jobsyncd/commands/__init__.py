"""The `jobsyncd` commands, one module per group of verbs; `jobsyncd.cli` imports each module only
when one of its commands runs."""
