"""What each agent's telemetry names mean, as data."""
