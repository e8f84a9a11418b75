"""The observability wing: metrics, the status page, the job routes and the request ledger."""
