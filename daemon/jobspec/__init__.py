"""The job-file language on the daemon side: hardened YAML, JobSpec, JSON Schema, resolution. No torch."""
