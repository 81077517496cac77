"""Device profiles and the cost model that turns their budgets into a byte budget and predictions (no torch)."""
