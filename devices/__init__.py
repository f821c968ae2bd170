"""Device profiles, runners (local, SSH, emulated), measurements, reports, latency models."""
