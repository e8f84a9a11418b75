"""The API wing: the Starlette app, one module per API surface, and the run of one request."""
