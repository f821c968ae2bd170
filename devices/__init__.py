"""Device profiles, runners (local, SSH, emulated), measurements, reports and the CLI."""
