"""HTTP endpoints for people and monitoring: operations (metrics, health)."""
