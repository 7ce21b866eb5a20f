"""The `confide` command, one module per command group (see `main.py` for the list)."""
