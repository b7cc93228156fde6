"""Acme's own Ledgerflow tools (an example of a team's tool package)."""
