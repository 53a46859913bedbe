"""Shared library of the mask-detection workflow: every bin/ job and workflow.py import it."""
