"""The supervisor wing: the one loop that owns every worker, its planners, states and processes."""
