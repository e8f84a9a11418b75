"""Code both sides import: the wire protocol, the config schema, size and path helpers.

Imports neither mlx nor starlette.
"""
