"""flipvisor: a supervisor that flips a service to a new generation with zero dropped requests."""

__version__ = "0.1.0"
