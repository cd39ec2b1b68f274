"""Placeholder: built in a later issue (see the issues list)."""
