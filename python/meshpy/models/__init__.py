"""Reading models: checkpoint files, configuration and tensor names per architecture family."""
