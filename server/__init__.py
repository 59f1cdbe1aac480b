"""MaaS-Base server: REST, watch, scheduler, controllers and the OpenAI-compatible gateway."""

__version__ = "0.1.0"
