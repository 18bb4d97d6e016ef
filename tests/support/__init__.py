"""Test support: a real Label Studio for integration tests, offline labelled datasets."""
