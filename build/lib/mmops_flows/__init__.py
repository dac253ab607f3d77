"""Prefect flows: thin wiring of `mmops` stages into tasks, schedules and deployments."""
