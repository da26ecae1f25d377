"""The worker side: protocol, process handle, process main, diffusers backend.

Only here may torch be imported, and only in the modules that run inside the worker process."""
