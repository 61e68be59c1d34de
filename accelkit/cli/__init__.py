"""The command-line interface. Modules here import only typer and the standard library at import time."""
