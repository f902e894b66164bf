"""The planner: hardware catalogue, cost and performance models, plan search, pipeline simulator."""
