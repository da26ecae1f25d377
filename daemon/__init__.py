"""wan-daemon: YAML job files in a folder -> Wan2.2 videos through Hugging Face diffusers."""

__version__ = "0.1.0"
