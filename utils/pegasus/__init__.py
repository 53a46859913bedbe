"""Workflow layer: the generator's configuration and Pegasus adapters, and the local executor.

No job code: it only reads and writes workflow files and runs bin/ scripts as processes.
"""
