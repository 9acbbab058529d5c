"""Prefect flows of shoprec: ingest, train, monitor."""
